"""Hostile instructions against one device, for both key stores: what it accepts and what it refuses.

    python -m simulations.probe_device --out outputs/probe_device.json

The cloud chooses the run config and the instruction; the device answers from its own floor
(its default device policy). Each row is one instruction sent to the real ClientApp in-process,
after one honest evaluation (``dchi``, epsilon 16, MiniLM split 3): ``accepted`` (with the reply's
``releases-per-example-max``) or ``refused`` with the device's own message. The key store is the
simulated device's memory (its ``context.state``) or a key file with its ledger (a deployed
device: each instruction then comes as a new run, a new context). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def probe(store: str, home: Path) -> list[dict]:
    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privtune_flwr import client_app as device_app
    from privtune_flwr import schema
    from privtune_flwr.config import RunConfig

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    base = dict(max_examples=200, batch_size=4, batches_per_round=2, max_length=24, audit_tokens=0, defense="dchi",
                epsilon=16.0, eval_examples=6, devices_per_round=1, min_devices=1)
    node = {"partition-id": 0, "num-partitions": 2, "key-store": store}
    if store == "file":
        node["key-file"] = str(home / "device.key")
    state = RecordDict()

    def send(run_config: dict, kind=MessageType.EVALUATE, content=None) -> tuple[str, str]:
        context = Context(run_id=1, node_id=1, node_config=node, state=state if store == "memory" else RecordDict(),
                          run_config=run_config)
        msg = Message(content=content or schema.instruction(1, 2), message_type=kind, dst_node_id=1)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        try:
            reply = device_app.app(msg, context)
            count = reply.content.metric_records[schema.METRICS].get("releases-per-example-max")
            return "accepted", f"releases-per-example-max={count:g}"
        except Exception as exc:  # noqa: BLE001 - the device's refusal is the result
            return "refused", f"{type(exc).__name__}: {exc}"

    honest = RunConfig(**base).to_flower()
    extra = schema.instruction(1, 2)
    extra["smuggled"] = ArrayRecord({"x": Array(np.zeros(1, np.float32))})
    cases = [
        ("the honest evaluation (dchi, eps 16)", honest, MessageType.EVALUATE, None),
        ("the same again (a re-send)", honest, MessageType.EVALUATE, None),
        ("eps 15.999 on the same examples", {**honest, "defense.epsilon": 15.999}, MessageType.EVALUATE, None),
        ("eps 15.998 on the same examples", {**honest, "defense.epsilon": 15.998}, MessageType.EVALUATE, None),
        ("defense.release='fresh' (fresh noise per send)", {**honest, "defense.release": "fresh"}, MessageType.EVALUATE, None),
        ("2 batches of 600 examples", {**honest, "train.batch-size": 600}, MessageType.TRAIN, None),
        ("model.max-length=4096", {**honest, "model.max-length": 4096}, MessageType.EVALUATE, None),
        ("model.name='roberta-base' (a hub id)", {**honest, "model.name": "roberta-base"}, MessageType.EVALUATE, None),
        ("model.name='/etc' (a local folder)", {**honest, "model.name": "/etc"}, MessageType.EVALUATE, None),
        ("smollm2 at split 1", {**honest, "model.name": "smollm2", "model.split-layer": 1, "data.task": "generation",
                                "federation.protocol": "u-shaped"}, "train.forward", None),
        ("defense.epsilon=64.000001", {**honest, "defense.epsilon": 64.000001}, MessageType.EVALUATE, None),
        ("fault-fraction=1 in the run config", {**honest, "fault-fraction": 1.0}, MessageType.EVALUATE, None),
        ("an instruction with an extra record", honest, MessageType.TRAIN, extra),
    ]
    rows = []
    for name, run_config, kind, content in cases:
        outcome, detail = send(run_config, kind, content)
        rows.append({"store": store, "instruction": name, "outcome": outcome, "detail": detail})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/probe_device.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for store in ("memory", "file"):
            rows += probe(store, Path(home) / store)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print("| key store | instruction | outcome | the device's answer |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['store']} | {r['instruction']} | {r['outcome']} | {r['detail'][:150]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
