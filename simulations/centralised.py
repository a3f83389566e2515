"""Centralised baseline: the same split, defence and number of LoRA steps, in one process.

``python -m simulations.centralised [--defense none] [--epsilon 16] [--out DIR]``

It reads the run's knobs from ``[tool.flwr.app.config]`` (overridable with ``--set key=value``),
so a federated run and this baseline differ only in who holds the data: here one device holds
the whole training set and the cloud takes ``federation.num-rounds x federation.devices-per-round x
train.batches-per-round`` steps on it, then scores the whole test set released through the defence.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tomllib
from pathlib import Path

import torch

from privtune_flwr import data
from privtune_flwr.config import RunConfig
from privtune_flwr.preflight import app_defaults
from privtune_flwr.models import load_split
from privtune_flwr.cloud import CloudSide
from simulations.training import fine_tune
from privtune_flwr.device import DeviceSide, device_defense

ROOT = Path(__file__).resolve().parent.parent


def default_config(overrides: dict) -> RunConfig:
    app = {**app_defaults(ROOT), **overrides}
    return RunConfig.from_flower(app)


def run(cfg: RunConfig) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ds = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=cfg.max_examples or None)
    split = load_split(cfg.model, cfg.split_layer, cfg.task, ds.num_labels, lora_rank=cfg.lora_rank, seed=cfg.seed,
                       lora_targets=cfg.lora_targets)
    defense = device_defense(cfg.defense, split, epsilon=cfg.epsilon, texts=ds.train["text"], labels=ds.train["label"],
                             task=cfg.task, max_length=cfg.max_length, seed=cfg.seed, release=cfg.release,
                             **cfg.defense_options())
    device = DeviceSide(split, defense, max_length=cfg.max_length, audit_tokens=0)
    cloud = CloudSide(split, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed)
    steps = cfg.num_rounds * cfg.devices_per_round * cfg.batches_per_round
    losses = fine_tune(device, cloud, ds.train, steps, seed=cfg.seed, progress=True)
    # The test release is also scored by the KNN self-audit (nearest anchor, on up to 4096 tokens).
    anchors = getattr(defense, "anchors", None)
    if anchors is None:
        from privtune_flwr.mechanism.anchors import get_tables

        anchors = get_tables(split, k=cfg.k, n_hops=cfg.n_hops, max_neighbours=cfg.max_neighbours).anchors
    device.anchors, device.audit_tokens = anchors, 4096
    rel = device.release(ds.test["text"], ds.test["label"])
    scores = cloud.evaluate(rel.hidden, rel.attention_mask, rel.labels)
    metrics = rel.metrics
    return {
        "config": cfg.to_flower(),
        "steps": steps,
        "final-train-loss": sum(losses[-10:]) / len(losses[-10:]),
        "test-accuracy": scores["accuracy"],
        "test-macro-f1": scores["macro-f1"],
        "test-examples": int(scores["num-examples"]),
        "test-self-audit-knn": metrics.get("self-audit-knn"),
        "wall-seconds": time.perf_counter() - t0,
        "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "privacy": defense.statement().to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="centralised split LoRA fine-tune (baseline for the federated run)")
    parser.add_argument("--defense", default=None)
    parser.add_argument("--epsilon", type=float, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a [tool.flwr.app.config] key")
    parser.add_argument("--out", default="outputs/centralised")
    args = parser.parse_args(argv)
    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:  # a TOML value (number, quoted string), as in --run-config; else the bare text
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = value
    if args.defense is not None:
        overrides["defense.name"] = args.defense
    if args.epsilon is not None:
        overrides["defense.epsilon"] = args.epsilon
    cfg = default_config(overrides)
    result = run(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"centralised-{cfg.defense}-eps{cfg.epsilon:g}-r{cfg.radius_scale:g}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(f"{'defense':<10} {'eps':>6} {'r-scale':>7} {'steps':>6} {'test acc':>9} {'macro-F1':>9} {'KNN':>6} {'wall s':>7}")
    print(f"{cfg.defense:<10} {cfg.epsilon:>6g} {cfg.radius_scale:>7g} {result['steps']:>6} {result['test-accuracy']:>9.4f} "
          f"{result['test-macro-f1']:>9.4f} {result['test-self-audit-knn']:>6.3f} {result['wall-seconds']:>7.1f}")
    print(f"written {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
