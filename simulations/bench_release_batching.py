"""What releasing one example per call of the bottom costs, beside grouping examples of a width.

    python -m simulations.bench_release_batching [--out DIR] [--texts N] [--batch B] [--reps R]

A device releases ``N`` Rotten Tomatoes training sentences in batches of ``B`` through MiniLM split
after block 3, with each defence of the table, once with ``chunk`` = 64 (every example of a padded
width in one call, as before) and once with ``chunk`` = 1 (one example per call, the default), the
two alternating ``R`` times in one process. It also releases each of the first 32 sentences alone
and inside its batch and counts those whose two releases are not bit-identical: release once
promises none. Prints a table and writes ``DIR/bench_release_batching.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from privtune_flwr import data
from privtune_flwr.device import DeviceSide, device_defense
from privtune_flwr.models import load_split

DEFENSES = ("none", "privtune", "label-subspace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench_release_batching")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("texts", "batch", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    torch.set_num_threads(args.threads)
    split = load_split("minilm", 3, "classification", 2, seed=0)
    ds = data.load_dataset("rotten_tomatoes", seed=0)
    texts, labels = ds.train["text"][:args.texts], ds.train["label"][:args.texts]
    rows = []
    for defense_name in DEFENSES:
        defense = device_defense(defense_name, split, epsilon=64.0, texts=texts, labels=labels, max_length=64,
                                 seed=0, subspace_rank=2)
        devices = {chunk: DeviceSide(split, defense, max_length=64, audit_tokens=0, chunk=chunk) for chunk in (64, 1)}
        encoded = devices[1].encode(texts)
        batches = [encoded[i:i + args.batch] for i in range(0, len(encoded), args.batch)]
        seconds = {64: [], 1: []}
        for _ in range(args.reps):
            for chunk, device in devices.items():
                t0 = time.perf_counter()
                for b in batches:
                    device.release_ids(b)
                seconds[chunk].append(time.perf_counter() - t0)
        differ = {}
        for chunk, device in devices.items():
            first = encoded[:min(32, len(encoded))]
            together = device.release_ids(first)
            differ[chunk] = 0
            for i, e in enumerate(first):
                alone = device.release_ids([e])
                n = len(e)
                differ[chunk] += not torch.equal(alone.hidden[0, :n], together.hidden[i, :n])
        best = {c: min(v) for c, v in seconds.items()}
        rows.append({"defense": defense_name, "texts": len(texts), "batch": args.batch,
                     "grouped_s": best[64], "per_example_s": best[1], "ratio": best[1] / best[64],
                     "grouped_not_identical": differ[64], "per_example_not_identical": differ[1],
                     "checked": min(32, len(encoded)), "seconds": seconds})
    print(f"{'defence':>15} {'grouped s':>10} {'per example s':>14} {'ratio':>6} {'not bit-identical (grouped / per example)':>44}")
    for r in rows:
        print(f"{r['defense']:>15} {r['grouped_s']:>10.2f} {r['per_example_s']:>14.2f} {r['ratio']:>6.2f} "
              f"{r['grouped_not_identical']:>20} / {r['per_example_not_identical']} of {r['checked']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_release_batching.json").write_text(json.dumps(rows, indent=1))
    print("written", out / "bench_release_batching.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
