"""Test accuracy with and without 20% poisoning devices (vanilla, in process, real ClientApps).

    python -m simulations.poisoning --out DIR [--seeds 0,1,2] [--rounds 3] [--kinds poison,flip]

Five devices, MiniLM split after block 1, defence dchi (eps 64), in-process Flower messages (the
same fake Grid as tests/test_strategy.py). For each seed: a clean run; runs with one device of five
(20%) poisoning with each kind of ``simulations.faults`` (``poison``: every value 9.9e5, under the
schema's max-abs, with flipped labels; ``flip``: honest releases with flipped labels), once with
the cloud's checks (the defence's envelope and ``max-grad-norm``) and once without them. Prints a
table (mean and standard error over seeds) and writes ``DIR/poisoning.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

NODE = {"allowed-defenses": "*", "max-epsilon": float("inf"), "key-store": "memory", "allow-reproducible-noise": True}


class Grid:
    """Delivers messages straight to each device's ClientApp (tests/test_strategy.py's fake)."""

    def __init__(self, cfg, devices: int, app):
        from flwr.app import Context, RecordDict

        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": devices, **NODE},
                                    state=RecordDict(), run_config=cfg.to_flower()) for n in range(1, devices + 1)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            node = m.metadata.dst_node_id
            try:
                reply = self.app(m, self.contexts[node])
            except Exception as exc:  # noqa: BLE001
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _identity() -> None:
    """Flower 1.42 stamps messages with the running task's identity; in process we act as run 1
    (as tests/conftest.py does)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def run_once(seed: int, kind: str | None, checks: bool, *, rounds: int, devices: int = 5, fraction: float = 0.2,
             max_examples: int = 1500, eval_examples: int = 40) -> dict:
    import torch

    from privtune_flwr import client_app as device_app
    from privtune_flwr.cloud import CloudSide
    from privtune_flwr.config import RunConfig
    from privtune_flwr.models import load_split
    from simulations.faults import FaultPlan, faulty_app
    from strategies import SplitLearningStrategy

    cfg = RunConfig(max_examples=max_examples, batch_size=8, batches_per_round=4, devices_per_round=devices,
                    min_devices=devices, num_rounds=rounds, max_length=32, audit_tokens=0, defense="dchi", epsilon=64.0,
                    eval_examples=eval_examples, reproducible_noise=True, timeout=60.0, round_retries=0, seed=seed,
                    max_grad_norm=1.0 if checks else 0.0)
    torch.manual_seed(seed)
    split = load_split("minilm", 1, num_labels=2, lora_rank=4, seed=seed)
    strategy = SplitLearningStrategy(CloudSide(split, learning_rate=1e-3, batch_size=cfg.batch_size), cfg)
    if not checks:
        strategy._enveloped = lambda plan: plan
    app = device_app.app if kind is None else faulty_app(FaultPlan(fraction=fraction, kinds=(kind,)))
    strategy.start(Grid(cfg, devices, app))
    rejected = [e for e in strategy.rejected.entries if e["phase"] == "train"]
    return {"seed": seed, "kind": kind or "clean", "checks": checks, "test-accuracy": strategy.history[-1]["test-accuracy"],
            "rejected-train-replies": len(rejected), "rejected-devices": sorted({e["device"] for e in rejected}),
            "envelope-rejections": sum("envelope" in e["cause"] for e in rejected)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default="poison,flip")
    parser.add_argument("--skip-clean", action="store_true", help="no clean run (it was run elsewhere)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    _identity()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    rows = []
    for seed in seeds:
        conditions = ([] if args.skip_clean else [(None, True)]) + [(k, c) for k in kinds for c in (True, False)]
        for kind, checks in conditions:
            row = run_once(seed, kind, checks, rounds=args.rounds)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "poisoning.json").write_text(json.dumps(rows, indent=2))
    print(f"{'condition':<28} {'test acc (mean)':>15} {'s.e.':>6} {'rejected/seed':>13}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        name = "clean" if r["kind"] == "clean" else f"{r['kind']} 20% " + ("with checks" if r["checks"] else "no checks")
        groups.setdefault(name, []).append(r)
    for name, rs in groups.items():
        accs = [r["test-accuracy"] for r in rs]
        se = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
        print(f"{name:<28} {statistics.mean(accs):>15.3f} {se:>6.3f} "
              f"{statistics.mean(r['rejected-train-replies'] for r in rs):>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
