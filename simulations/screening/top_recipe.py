"""What the cloud's top trains, for `none` at convergence, through the sweep's own data, split and
stopping rule (headline sizes, decays 2; docs/results.md, "The top's recipe").

    python -m simulations.screening top-recipe SEED SPLIT_LAYER TARGETS POOLER [LORA_RANK] [LEARNING_RATE] [MAX_STEPS] [MAX_EXAMPLES] > out.json

TARGETS: comma-separated LoRA target modules of the top (the default is ``query,value``), or
``full``: no LoRA, every weight of the top trained (its blocks, the pooler and the classifier;
the bottom stays frozen, so the releases do not change); SPLIT_LAYER 0 then fine-tunes the whole
model above the frozen embeddings, the unsplit model's ceiling;
POOLER: 1 makes the pretrained pooler trainable beside the classifier;
LEARNING_RATE: in place of the headline's 1e-3 (a full fine-tune wants about 5e-5);
MAX_STEPS, MAX_EXAMPLES: the headline's cap on steps and its examples (0 = all), smaller for a
quick check.
"""
import json
import sys
import time

import torch


def main(argv) -> dict:
    """The converged utility of `none` under one top recipe (printed as one JSON line)."""
    from privtune_flwr import models
    from privtune_flwr.defenses import build_defense
    from simulations import privacy_utility as pu

    seed, layer, targets, pooler = int(argv[0]), int(argv[1]), tuple(argv[2].split(",")), argv[3] == "1"
    full = targets == ("full",)
    rank = 0 if full else int(argv[4]) if len(argv) > 4 else 8
    lr = float(argv[5]) if len(argv) > 5 else pu.HEADLINE_COMMON["learning_rate"]
    sizes = {}
    if len(argv) > 6:
        sizes["max_steps"] = int(argv[6])
    if len(argv) > 7:
        sizes["max_examples"] = int(argv[7])
    torch.set_num_threads(1)
    pu.log_validation_scores()
    settings = pu.SweepSettings(**{**pu.HEADLINE_COMMON, "split_layer": layer, "subspace_rank": 2, "decays": 2,
                                   "learning_rate": lr, **sizes})
    encoder_targets, load_split = models.LORA_TARGETS["encoder"], pu.load_split
    try:  # the recipe is set for this screen only, and put back after it
        if not full:
            models.LORA_TARGETS["encoder"] = targets
        if rank != 8:
            pu.load_split = lambda *a, **k: load_split(*a, **{**k, "lora_rank": rank})
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
    finally:
        models.LORA_TARGETS["encoder"], pu.load_split = encoder_targets, load_split
    out.update(seed=seed, split_layer=layer, targets=list(targets), pooler=pooler or full, lora_rank=rank, learning_rate=lr,
               trainable=trainable, seconds=round(time.time() - start, 1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
