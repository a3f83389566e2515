"""Peak cloud memory and time of one evaluation when devices are hostile (issue 31).

    python -m simulations.bench_hostile_eval                 # bounded (this code) and unbounded (as before)
    python -m simulations.bench_hostile_eval --devices 10 --out outputs/bench_hostile_eval.json

Every case runs in a fresh process (MiniLM split 3, rotten_tomatoes, ``eval-examples = 0``,
``max-length = 64``, one torch thread). The bounded mode runs the strategy's own
``evaluate_round`` through :class:`~strategies.reporting.ProgressGrid` over a stand-in SuperLink
that builds each device's reply when the cloud pulls it (the link holds replies, not the
cloud). Measured around the round: the process's resident memory just before it, its peak during
it (``VmHWM``, reset just before; replies the cloud holds are counted in it) and the wall time.

Cases:

* ``honest``: every device releases its iid share of the test split (random values, the real
  sentence lengths: the cloud's cost depends on shapes, not values);
* ``one-at-budget`` / ``ten-at-budget``: one device (the others honest) or all ten send the
  largest reply the cloud accepts: the evaluation budget's sequences, every one ``max-length``
  real tokens;
* ``one-schema-max`` / ``ten-schema-max``: a reply of ``reply-max-examples`` (2,048) sequences of
  64 tokens, what the schema could hold before (201 MB): now dropped as it arrives, unread.

The ``unbounded`` mode is the code before issue 31, replayed here: every reply is delivered and
held, the evaluation bound is ``reply-max-examples``, every reply is parsed first and then run
through the top in one piece.
Its ``ten-schema-max`` case is left out by default (about ten times one reply's 35 s and several
GB); ``--all`` runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = ("honest", "one-at-budget", "ten-at-budget", "one-schema-max", "ten-schema-max")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(case: str, mode: str, devices: int, split_layer: int) -> dict:
    """One case in this (fresh) process; returns its measurements."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from flwr.app import Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Flower stamps messages with a run

    from privtune_flwr import data, schema
    from privtune_flwr.cloud import CloudSide
    from privtune_flwr.tasks import classification_metrics
    from privtune_flwr.config import RunConfig
    from privtune_flwr.models import load_split
    from strategies import SplitLearningStrategy

    torch.manual_seed(0)
    cfg = RunConfig(split_layer=split_layer, eval_examples=0, max_length=64, dataset="rotten_tomatoes",
                    devices_per_round=devices, min_devices=devices)
    split = load_split(cfg.model, cfg.split_layer, num_labels=2, lora_rank=cfg.lora_rank, seed=0)
    cloud = CloudSide(split, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size)
    strategy = SplitLearningStrategy(cloud, cfg)
    strategy.partition = {100 + p: p for p in range(devices)}  # every device has said which partition it holds
    d = split.hidden_size

    test = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed).test
    budget = -(-len(test) // devices)  # what the bounded cloud computes (checked below)
    gen = torch.Generator().manual_seed(1)

    def release(hidden, mask, labels):
        return schema.release_content(hidden, mask, labels, {"num-examples": len(labels), "num-tokens": float(mask.sum())})

    def reply(node: int, content) -> Message:
        instruction = Message(content=schema.instruction(1, 0), message_type=MessageType.EVALUATE, dst_node_id=node)
        instruction.metadata.__dict__["_message_id"] = instruction.object_id
        out = Message(content, reply_to=instruction)
        out.metadata.__dict__["_src_node_id"] = node
        return out

    def honest(p: int):
        share = data.partition(test, devices, p, partitioner="iid", seed=cfg.seed)
        lengths = [len(ids) for ids in split.tokenizer(list(share["text"]), truncation=True, max_length=cfg.max_length)["input_ids"]]
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        hidden = torch.randn(*mask.shape, d, generator=gen) * mask.unsqueeze(-1)
        return release(hidden, mask, torch.tensor(list(share["label"])))

    def hostile(p: int, n: int):
        hidden = torch.randn(n, cfg.max_length, d, generator=gen)
        return release(hidden, torch.ones(n, cfg.max_length, dtype=torch.long), torch.zeros(n, dtype=torch.long))

    n_hostile = {"honest": 0, "one-at-budget": 1, "ten-at-budget": devices, "one-schema-max": 1,
                 "ten-schema-max": devices}[case]
    size = budget if "budget" in case else cfg.reply_max_examples

    def content_of(p: int):
        """Device ``p``'s reply content, built when the cloud pulls it (the SuperLink held it)."""
        if p >= n_hostile:
            return honest(p)
        if "budget" in case:
            return hostile(p, size)
        # schema-max: 201 MB of representation bytes, built as gRPC would deliver them (one bytes
        # object; values do not matter to what the cloud's memory does)
        hidden = np.zeros((size, cfg.max_length, d), dtype=np.float32)
        content = schema.release_content(torch.from_numpy(hidden), torch.ones(size, cfg.max_length, dtype=torch.long),
                                         torch.zeros(size, dtype=torch.long),
                                         {"num-examples": size, "num-tokens": float(size * cfg.max_length)})
        del hidden
        return content

    received = []
    if mode == "bounded":  # through the strategy's own round: the grid pulls one reply at a time
        from strategies.reporting import ProgressGrid

        class Link:  # the SuperLink: it holds each reply until the cloud pulls it
            def __init__(self):
                self.sent = {}

            def get_node_ids(self):
                return sorted(strategy.partition)

            def push_messages(self, messages):
                for m in messages:
                    m.metadata.__dict__["_message_id"] = m.object_id
                    self.sent[m.object_id] = m
                return [m.object_id for m in messages]

            def pull_messages(self, ids):
                out = []
                for i in ids:
                    asked = self.sent.pop(i)
                    content = content_of(asked.metadata.dst_node_id - 100)
                    received.append(sum(len(a.data) for a in content.array_records[schema.RELEASED].values()))
                    r = Message(content, reply_to=asked)
                    r.metadata.__dict__["_src_node_id"] = asked.metadata.dst_node_id
                    out.append(r)
                return out

        grid = ProgressGrid(Link())
        strategy._contacted = set(strategy.partition)  # no device is new: the round's plain timeout
        strategy._t_round = time.perf_counter()
        strategy._round = {"round": 1}
        assert strategy.evaluation_examples() == budget
        gc.collect()
        before = _status_mb("VmRSS")
        reset = _reset_peak()
        t0 = time.perf_counter()
        strategy.evaluate_round(grid, 1)
        metrics = strategy.history[-1] if strategy.history else {}
        scored, rejected = metrics.get("test-num-examples", 0.0), len(strategy.rejected)
    else:  # the code before issue 31: every reply delivered and held, the schema's bound, each scored in one piece
        replies = []
        for p in range(devices):
            content = content_of(p)
            received.append(sum(len(a.data) for a in content.array_records[schema.RELEASED].values()))
            replies.append(reply(100 + p, content))
            gc.collect()
        gc.collect()
        before = _status_mb("VmRSS")
        reset = _reset_peak()
        t0 = time.perf_counter()
        plan = schema.Plan(hidden_size=d, num_labels=2, max_examples=cfg.reply_max_examples, max_tokens=cfg.max_length)
        valid, rejected = [], 0
        for r in replies:
            try:
                valid.append(schema.parse_release(r.content, plan))
            except schema.SchemaError:
                rejected += 1
        split.top.eval()
        with torch.no_grad():
            logits = torch.cat([split.top(v.hidden, v.attention_mask) for v in valid])
        classification_metrics(logits, torch.cat([v.labels for v in valid]), 2)
        scored = float(sum(v.num_examples for v in valid))
    wall = time.perf_counter() - t0
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    received_mb = sum(received) / 2**20
    return {"case": case, "mode": mode, "devices": devices, "hostile": n_hostile, "hostile-sequences": size if n_hostile else 0,
            "budget": budget, "received-mb": received_mb, "rss-before-mb": before, "peak-mb": peak,
            "added-mb": peak - before, "seconds": wall, "scored-examples": scored, "rejected": rejected,
            "peak-is-evaluation-only": reset}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--split-layer", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench_hostile_eval.json")
    ap.add_argument("--bounded-only", action="store_true", help="skip the replay of the code before issue 31")
    ap.add_argument("--all", action="store_true", help="also run ten schema-max replies through the unbounded code")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.devices, args.split_layer)))
        return 0
    runs = [(c, "bounded") for c in CASES]
    if not args.bounded_only:
        runs += [(c, "unbounded") for c in CASES if c != "ten-schema-max" or args.all]
    rows = []
    for case, mode in runs:
        cmd = [sys.executable, "-m", "simulations.bench_hostile_eval", "--devices", str(args.devices),
               "--split-layer", str(args.split_layer), "--child", case, mode]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {case} ({mode}) failed with exit code {done.returncode}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {mode:9s} {case:15s} peak {row['peak-mb']:7.0f} MB  {row['seconds']:6.1f} s", file=sys.stderr, flush=True)
    honest = {r["mode"]: r for r in rows if r["case"] == "honest"}
    for r in rows:
        base = honest[r["mode"]]
        r["peak-vs-honest"] = r["peak-mb"] / base["peak-mb"]
        r["added-vs-honest"] = r["added-mb"] / max(base["added-mb"], 1.0)
    header = (f"{'mode':9s} {'case':15s} {'hostile':>7s} {'seqs':>5s} {'received MB':>11s} {'before MB':>9s} {'peak MB':>8s} "
              f"{'x honest':>8s} {'added MB':>8s} {'seconds':>7s} {'scored':>6s} {'rejected':>8s}")
    print(header)
    for r in rows:
        print(f"{r['mode']:9s} {r['case']:15s} {r['hostile']:7d} {r['hostile-sequences']:5d} {r['received-mb']:11.0f} "
              f"{r['rss-before-mb']:9.0f} {r['peak-mb']:8.0f} {r['peak-vs-honest']:8.2f} {r['added-mb']:8.0f} "
              f"{r['seconds']:7.1f} {int(r['scored-examples']):6d} {r['rejected']:8d}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"devices": args.devices, "split-layer": args.split_layer, "threads": 1, "rows": rows}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
