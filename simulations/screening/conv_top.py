"""Screen what the cloud's top trains for `none` at convergence, through the sweep's own data,
split and stopping rule (headline sizes, decays 2).

    python -m simulations.screening.conv_top SEED SPLIT_LAYER TARGETS POOLER [LORA_RANK] [LEARNING_RATE] > out.json

TARGETS: comma-separated LoRA target modules of the top (the default is ``query,value``), or
``full``: no LoRA, every weight of the top trained (its blocks, the pooler and the classifier;
the bottom stays frozen, so the releases do not change); SPLIT_LAYER 0 then fine-tunes the whole
model above the frozen embeddings, the unsplit model's ceiling;
POOLER: 1 makes the pretrained pooler trainable beside the classifier;
LEARNING_RATE: in place of the headline's 1e-3 (a full fine-tune wants about 5e-5).
"""
import json
import sys
import time

import torch

from privtune_flwr import models
from privtune_flwr.defenses import build_defense
from simulations import privacy_utility as pu

seed, layer, targets, pooler = int(sys.argv[1]), int(sys.argv[2]), tuple(sys.argv[3].split(",")), sys.argv[4] == "1"
full = targets == ("full",)
rank = 0 if full else int(sys.argv[5]) if len(sys.argv) > 5 else 8
lr = float(sys.argv[6]) if len(sys.argv) > 6 else pu.HEADLINE_COMMON["learning_rate"]
torch.set_num_threads(1)
pu.log_validation_scores()
if not full:
    models.LORA_TARGETS["encoder"] = targets
settings = pu.SweepSettings(**{**pu.HEADLINE_COMMON, "split_layer": layer, "subspace_rank": 2, "decays": 2,
                               "learning_rate": lr})
if rank != 8:
    original = models.load_split
    pu.load_split = lambda *a, **k: original(*a, **{**k, "lora_rank": rank})
ctx = pu.dataset_context("rotten_tomatoes", seed, settings)
if full:
    ctx.split.top.requires_grad_(True)
elif pooler:
    for name, p in ctx.split.top.named_parameters():
        if ".pooler." in name:
            p.requires_grad_(True)
trainable = sum(p.numel() for p in ctx.split.top.parameters() if p.requires_grad)
start = time.time()
out = pu.classification_utility("rotten_tomatoes", ctx.split, build_defense("none", split=ctx.split), ctx.train,
                                 ctx.validation, ctx.test, settings, seed)
out.update(seed=seed, split_layer=layer, targets=list(targets), pooler=pooler or full, lora_rank=rank, learning_rate=lr,
           trainable=trainable,
           seconds=round(time.time() - start, 1))
print(json.dumps(out))
