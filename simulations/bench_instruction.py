"""Peak memory and time of one device instruction, up to the device floor's caps and past them.

    python -m simulations.bench_instruction --out outputs/bench_instruction

Each row runs in a fresh process: a device (the product's ClientApp, called in-process as the
simulation engine calls it) sets up with a one-example evaluation, then answers one evaluation
instruction of ``examples`` IMDB test reviews at ``max-length`` tokens (long reviews, so every
example fills its length). It reports the peak RSS after set-up, the peak after the instruction,
their difference and the instruction's seconds. Rows past the caps (``max-examples-per-instruction``
1024, ``max-tokens-per-example`` 256 by default) show the refusal and its time instead: the device
refuses before it reads a single example, so its memory does not move. Prints a table, writes
``OUT/bench_instruction.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(examples: int, max_length: int, split_layer: int) -> dict:
    import resource

    import torch
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privtune_flwr import client_app as device_app
    from privtune_flwr import schema
    from privtune_flwr.config import RunConfig

    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 - MB (Linux: KiB)

    def ask(cfg, context):
        msg = Message(content=schema.instruction(1, 0), message_type=MessageType.EVALUATE, dst_node_id=1)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        context.run_config = cfg.to_flower()
        return device_app.app(msg, context)

    common = dict(dataset="imdb", defense="dchi", epsilon=64.0, split_layer=split_layer, audit_tokens=0,
                  devices_per_round=1, min_devices=1)
    node = {"partition-id": 0, "num-partitions": 1, "key-store": "memory"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    ask(RunConfig(**common, max_length=min(max_length, 256), eval_examples=1), context)  # set-up: load, fit, tables
    base = rss()
    cfg = RunConfig(**common, max_length=max_length, eval_examples=examples)
    t0 = time.perf_counter()
    try:
        reply = ask(cfg, context)
        outcome = f"released {int(reply.content.metric_records[schema.METRICS]['num-examples'])}"
        payload = sum(a.numpy().nbytes for rec in reply.content.array_records.values() for a in rec.values())
    except ValueError as exc:  # PolicyError: refused before any work
        outcome, payload = f"refused: {str(exc)[:90]}", 0
    seconds = time.perf_counter() - t0
    peak = rss()
    return {"examples": examples, "max-length": max_length, "outcome": outcome, "seconds": seconds,
            "rss-after-setup-mb": base, "rss-peak-mb": peak, "growth-mb": peak - base, "reply-mb": payload / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench_instruction", type=Path)
    parser.add_argument("--sizes", default="64:256,256:256,1024:256,2048:256,64:512",
                        help="examples:max-length per row (comma-separated)")
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)
    if args.one:
        examples, length = (int(v) for v in args.one.split(":"))
        print(json.dumps(one(examples, length, args.split_layer)))
        return 0
    rows = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for size in args.sizes.split(","):
        proc = subprocess.run([sys.executable, "-m", "simulations.bench_instruction", "--one", size,
                               "--split-layer", str(args.split_layer)], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['examples']:>6} x {r['max-length']:>4} tokens  {r['seconds']:7.2f} s  setup {r['rss-after-setup-mb']:7.0f} MB  "
              f"peak {r['rss-peak-mb']:7.0f} MB  growth {r['growth-mb']:6.0f} MB  reply {r['reply-mb']:6.1f} MB  {r['outcome']}",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_instruction.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
