"""Screen what the cloud's top trains for `none` at convergence, through the sweep's own data,
split and stopping rule (headline sizes, decays 2).

    python -m simulations.screening.conv_top SEED SPLIT_LAYER TARGETS POOLER [LORA_RANK] > out.json

TARGETS: comma-separated LoRA target modules of the top (the default is ``query,value``);
POOLER: 1 makes the pretrained pooler trainable beside the classifier.
"""
import json
import sys
import time

import torch

from privtune_flwr import models
from privtune_flwr.defenses import build_defense
from simulations import privacy_utility as pu

seed, layer, targets, pooler = int(sys.argv[1]), int(sys.argv[2]), tuple(sys.argv[3].split(",")), sys.argv[4] == "1"
rank = int(sys.argv[5]) if len(sys.argv) > 5 else 8
torch.set_num_threads(1)
models.LORA_TARGETS["encoder"] = targets
settings = pu.SweepSettings(**{**pu.HEADLINE_COMMON, "split_layer": layer, "subspace_rank": 2, "decays": 2})
if rank != 8:
    original = models.load_split
    pu.load_split = lambda *a, **k: original(*a, **{**k, "lora_rank": rank})
ctx = pu.dataset_context("rotten_tomatoes", seed, settings)
if pooler:
    for name, p in ctx.split.top.named_parameters():
        if ".pooler." in name:
            p.requires_grad_(True)
trainable = sum(p.numel() for p in ctx.split.top.parameters() if p.requires_grad)
start = time.time()
out = pu.classification_utility("rotten_tomatoes", ctx.split, build_defense("none", split=ctx.split), ctx.train,
                                 ctx.validation, ctx.test, settings, seed)
out.update(seed=seed, split_layer=layer, targets=list(targets), pooler=pooler, lora_rank=rank, trainable=trainable,
           seconds=round(time.time() - start, 1))
print(json.dumps(out))
