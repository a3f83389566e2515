"""What the device pays per split layer: bottom time, weights, release size, and the label fit.

    python -m simulations.bench_split_layers --out DIR [--layers 1,2,3,4,5] [--threads 1] [--reps 5]
        [--defenses label-subspace,label-obfuscator] [--rank 2]

For MiniLM split after each of ``--layers`` blocks, on CPU, a batch of 32 Rotten Tomatoes
sentences (real lengths, at most 64 tokens): the bottom's forward time (median of ``--reps``
after a warm-up), the perturbation time of each of ``--defenses`` on top of it, the bottom's
parameter count and float32 bytes, and the bytes one released sentence takes. The bottom and
defence times are for the whole batch in one call; a device releases one example per call
(``device.ROWS_PER_CALL``, for bit-identical re-sends), so the table also times
``DeviceSide.release`` of the same 32 sentences as the device runs it, with ``none`` and with each
defence, in the same process: their difference is what the defence adds per release. Also, once
per layer and defence, the one-off cost of fitting it (the label subspace, or the obfuscator network) on
``--fit-examples`` of the device's sentences (bottom pass plus fit); the defences of one layer run
side by side in one process, so their ratio is measured under the same load. Prints a table and
writes ``DIR/bench_split_layers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from privtune_flwr import data
from privtune_flwr.defenses import build_defense
from privtune_flwr.device import DeviceSide, device_obfuscator, device_subspace
from privtune_flwr.models import load_split
from simulations.bench_mechanism import _median_time


FITS = {"label-subspace": (device_subspace, "subspace"), "label-obfuscator": (device_obfuscator, "obfuscator")}


def measure(layer: int, texts: list[str], fit_texts: list[str], fit_labels: list[int], *, reps: int, rank: int,
            defenses=("label-subspace",)) -> list[dict]:
    split = load_split("minilm", layer, "classification", 2, lora_rank=0)
    enc = split.tokenize(texts, 64)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    bottom_s = _median_time(lambda: split.bottom(ids, mask), reps)
    hidden = split.bottom(ids, mask)
    params = sum(p.numel() for p in split.bottom.parameters())
    embeddings = sum(p.numel() for n, p in split.bottom.named_parameters() if "embeddings" in n)
    plain = DeviceSide(split, build_defense("none", epsilon=None, split=split), max_length=64, audit_tokens=0)
    release_none_s = _median_time(lambda: plain.release(texts), reps)
    rows = []
    for name in defenses:
        fit, option = FITS[name]
        t0 = time.perf_counter()
        fitted = fit(split, fit_texts, fit_labels, rank=rank)
        fit_s = time.perf_counter() - t0
        defense = build_defense(name, epsilon=64.0, split=split, seed=0, subspace_rank=rank, **{option: fitted})
        defense_s = _median_time(lambda: defense(hidden, ids, mask), reps)
        device = DeviceSide(split, defense, max_length=64, audit_tokens=0)
        release_s = _median_time(lambda: device.release(texts), reps)
        release = device.release(texts)
        rows.append({
            "split_layer": layer, "defense": name, "bottom_ms_per_batch": 1000 * bottom_s,
            "defense_ms_per_batch": 1000 * defense_s, "release_none_ms_per_batch": 1000 * release_none_s,
            "release_ms_per_batch": 1000 * release_s, "bottom_params": params, "bottom_block_params": params - embeddings,
            "bottom_mb_float32": params * 4 / 2**20, "release_kb_per_sentence": release.metrics["bytes-sent"] / len(texts) / 1024,
            "fit_seconds": fit_s, "fit_examples": len(fit_texts), "batch": len(texts), "tokens": int(mask.sum()),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", default="1,2,3,4,5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--fit-examples", type=int, default=768, help="sentences the defence is fitted on (a device's share)")
    parser.add_argument("--defenses", default="label-subspace", help=f"comma-separated, of: {', '.join(FITS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    defenses = [x.strip() for x in args.defenses.split(",") if x.strip()]
    unknown = [x for x in defenses if x not in FITS]
    if unknown or not defenses:
        parser.error(f"--defenses {args.defenses!r}: accepted: one or more of {', '.join(FITS)}")
    ds = data.load_dataset("rotten_tomatoes", seed=0)
    texts = list(ds.test["text"][:32])
    fit = ds.train.select(range(min(args.fit_examples, len(ds.train))))
    rows = [r for m in layers for r in measure(m, texts, list(fit["text"]), list(fit["label"]), reps=args.reps,
                                               rank=args.rank, defenses=defenses)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_split_layers.json").write_text(json.dumps({"threads": args.threads, "rank": args.rank, "rows": rows}, indent=1))
    print(f"MiniLM on CPU, {args.threads} thread(s), batch of {len(texts)} sentences ({rows[0]['tokens']} tokens)")
    print(f"{'layer':>5} {'defence':>16} {'bottom ms':>10} {'defence ms':>11} {'block params':>13} {'bottom MB':>10} "
          f"{'release KB/sent':>16} {'fit s (' + str(args.fit_examples) + ' sent)':>18} {'device ms: none':>16} "
          f"{'with defence':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['split_layer']:>5} {r['defense']:>16} {r['bottom_ms_per_batch']:>10.1f} {r['defense_ms_per_batch']:>11.2f} "
              f"{r['bottom_block_params']:>13,} {r['bottom_mb_float32']:>10.1f} {r['release_kb_per_sentence']:>16.1f} "
              f"{r['fit_seconds']:>18.1f} {r['release_none_ms_per_batch']:>16.1f} {r['release_ms_per_batch']:>13.1f} "
              f"{r['release_ms_per_batch'] / r['release_none_ms_per_batch']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
