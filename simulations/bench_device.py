"""What a device needs: peak memory and time of the device half (bottom, defence, head).

    python -m simulations.bench_device --out DIR [--model smollm2 --split-layer 2 --task generation]
                                       [--defense privtune] [--batch 4] [--tokens 128]

Loads the device's copy of the split (for the u-shaped protocol: bottom and head only; the middle
is freed), builds the defence from a small local corpus (PrivTune: its anchor tables, timed and
sized when built for the first time), releases one batch and, for u-shaped, takes one head step
on the middle's outputs. Prints a table and writes ``DIR/bench_device.json``. Peak memory is the
process's resident high-water mark (``ru_maxrss``), which includes the Python interpreter, torch
and the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--split-layer", type=int, default=2)
    parser.add_argument("--task", default="generation", choices=["classification", "generation"])
    parser.add_argument("--protocol", default="u-shaped", choices=["vanilla", "u-shaped"])
    parser.add_argument("--defense", default="privtune")
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from privtune_flwr import data
    from privtune_flwr.device import DeviceHead, DeviceSide, device_defense
    from dataclasses import asdict

    from privtune_flwr.mechanism import anchors as anc
    from privtune_flwr.registry import GraphOptions

    GRAPH = asdict(GraphOptions())  # the run config's graph options (their one source)
    from privtune_flwr.models import load_split

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {k: getattr(args, k) for k in ("model", "split_layer", "task", "protocol", "defense", "epsilon", "batch", "tokens")}
    t0 = time.perf_counter()
    split = load_split(args.model, args.split_layer, args.task, 2, lora_rank=8, protocol=args.protocol)
    if args.protocol == "u-shaped":
        split = split.without_middle()
    result["load-seconds"] = time.perf_counter() - t0
    result["device-parameters"] = sum(p.numel() for p in split.bottom.parameters()) + (
        sum(p.numel() for p in split.head.parameters()) if split.head is not None else 0)
    name = "bbc_headlines" if args.task == "generation" else "rotten_tomatoes"
    ds = data.load_dataset(name, max_examples=200)
    if args.task == "generation":
        texts = [p + c for p, c in (data.generation_pair(name, t, g) for t, g in zip(ds.train["text"], ds.train["target"]))]
        labels = None
    else:
        texts, labels = list(ds.train["text"]), list(ds.train["label"])
    if args.defense.startswith("privtune"):
        cached = anc._key_name(anc._key(split, GRAPH["k"], GRAPH["n_hops"], GRAPH["max_neighbours"]))
        fresh = not any((anc.cache_dir() / "anchors").glob(f"{cached}*")) if (anc.cache_dir() / "anchors").exists() else True
        t0 = time.perf_counter()
        tables = anc.get_tables(split, **GRAPH)
        result["tables-seconds"] = time.perf_counter() - t0
        result["tables-built-now"] = fresh
        result["tables-bytes"] = tables.nbytes
        result["vocab-size"] = split.vocab_size
    t0 = time.perf_counter()
    defense = device_defense(args.defense, split, epsilon=args.epsilon, texts=texts, labels=labels, task=args.task,
                             max_length=args.tokens, seed=0)
    result["defense-build-seconds"] = time.perf_counter() - t0
    device = DeviceSide(split, defense, max_length=args.tokens, audit_tokens=0)
    batch = texts[: args.batch]
    device.release(batch)  # warm-up
    t0 = time.perf_counter()
    rel = device.release(batch)
    result["release-seconds"] = time.perf_counter() - t0
    result["release-shape"] = list(rel.hidden.shape)
    if args.protocol == "u-shaped":
        head = DeviceHead(split, learning_rate=1e-3)
        outputs = torch.randn(rel.hidden.shape)  # stands in for the middle's outputs
        targets = rel.input_ids if args.task == "generation" else torch.tensor(labels[: args.batch])
        t0 = time.perf_counter()
        head.step(outputs, rel.attention_mask, targets)
        result["head-step-seconds"] = time.perf_counter() - t0
    result["peak-rss-mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.out / "bench_device.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:<22} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
