"""Training throughput of the Flower run against centralised split LoRA training, side by side.

    python -m simulations.throughput --defenses none,label-subspace --out outputs/throughput.json

For each defence, in one command on one machine:

* **federated**: the Flower app through the launcher (``flwr run``, Ray backend), ``--devices``
  devices all sampled every round, ``--rounds`` rounds of ``batches-per-round`` batches of
  ``batch-size``; evaluation is cut to one example on one device per round, so the round is the
  training. Samples per second = training examples / the rounds' wall time (set-up excluded: the
  first round, where each device loads its bottom and fits its defence, is reported apart).
* **centralised**: the same model, split, defence, batch size and number of LoRA steps in one
  process (``simulations.training.fine_tune``: the device pipeline releases each batch, the top
  trains on it). Samples per second = examples / the training loop's wall time (set-up, the
  defence's fit included in neither).

Prints a table of both and their ratio and writes the JSON list.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def federated(defense: str, args) -> dict:
    folder = args.out.with_suffix("") / f"federated-{defense}"
    config = (f"defense.name='{defense}' federation.num-rounds={args.rounds} federation.devices-per-round={args.devices} federation.min-devices={args.devices} "
              f"train.batches-per-round={args.batches} train.batch-size={args.batch_size} federation.eval-devices=1 federation.final-eval-all=false "
              f"federation.eval-examples=1 defense.audit-tokens=0 {args.run_config}").strip()
    cmd = [sys.executable, "-m", "privtune_flwr.launch", "--devices", str(args.devices), "--out", str(folder),
           "--run-config", config] + (["--device-policy", "allowed-defenses='*'"] if defense == "none" else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    results_file = folder / "latest" / "results.json"
    if proc.returncode != 0 or not results_file.exists():
        return {"defense": defense, "mode": "federated", "failed": True, "tail": (proc.stdout + proc.stderr)[-1500:]}
    rounds = json.loads(results_file.read_text())["rounds"]
    later = rounds[1:]
    examples = sum(r["num-examples"] for r in later)
    seconds = sum(r["round-seconds"] for r in later)
    return {"defense": defense, "mode": "federated", "examples": examples, "seconds": seconds,
            "samples_per_second": examples / seconds, "first_round_seconds": rounds[0]["round-seconds"],
            "test_accuracy": rounds[-1].get("test-accuracy")}


def centralised(defense: str, args) -> dict:
    import torch

    from privtune_flwr import data
    from privtune_flwr.cloud import CloudSide
    from simulations.training import fine_tune
    from privtune_flwr.config import RunConfig
    from privtune_flwr.device import DeviceSide, device_defense
    from privtune_flwr.models import load_split
    from privtune_flwr.launch import app_defaults

    cfg = RunConfig.from_flower({**app_defaults(), "defense.name": defense, "train.batch-size": args.batch_size})
    torch.manual_seed(cfg.seed)
    ds = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed)
    split = load_split(cfg.model, cfg.split_layer, cfg.task, ds.num_labels, lora_rank=cfg.lora_rank, seed=cfg.seed,
                       lora_targets=cfg.lora_targets)
    # the defence a device of the federated run builds, on one device's share (its fit is set-up)
    share = data.partition(ds.train, args.devices, 0, seed=cfg.seed)
    defense_module = device_defense(defense, split, epsilon=cfg.epsilon, texts=share["text"], labels=share["label"],
                                    task=cfg.task, max_length=cfg.max_length, release=cfg.release, **cfg.defense_options())
    device = DeviceSide(split, defense_module, max_length=cfg.max_length, audit_tokens=0)
    cloud = CloudSide(split, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed)
    steps = (args.rounds - 1) * args.devices * args.batches  # as many as the federated rounds that are timed
    t0 = time.perf_counter()
    fine_tune(device, cloud, ds.train, steps, seed=cfg.seed)
    seconds = time.perf_counter() - t0
    return {"defense": defense, "mode": "centralised", "examples": steps * args.batch_size, "seconds": seconds,
            "samples_per_second": steps * args.batch_size / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defenses", default="none,label-subspace")
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="the first is set-up; the others are timed")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--out", type=Path, default=Path("outputs/throughput.json"))
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds={args.rounds} must be >= 2 (the first round is set-up, the rest are timed)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for defense in args.defenses.split(","):
        for run in (centralised, federated):
            rows.append(run(defense, args))
            args.out.write_text(json.dumps(rows, indent=2))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'defence':<16} {'centralised samples/s':>22} {'federated samples/s':>20} {'ratio':>6}")
    for defense in args.defenses.split(","):
        c, f = (next(r for r in rows if r["defense"] == defense and r["mode"] == m) for m in ("centralised", "federated"))
        if c.get("failed") or f.get("failed"):
            print(f"{defense:<16} FAILED")
            continue
        print(f"{defense:<16} {c['samples_per_second']:>22.1f} {f['samples_per_second']:>20.1f} "
              f"{f['samples_per_second'] / c['samples_per_second']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
