"""Faulty devices, for tests and the faults benchmark: a Flower Mod attached on the device side.

The product's ClientApp has no fault switch: whatever the cloud puts in the run config, an honest
device behaves. To see how the cloud copes with devices that crash, stall or send garbage, a test
or a benchmark runs :data:`app` (the product's handlers behind :func:`fault_mod`) instead of
``privtune_flwr.client_app:app``. The plan comes from the device's own process: the
``PRIVTUNE_FAULTS`` environment variable, in node-config syntax::

    PRIVTUNE_FAULTS="fraction=0.2 kinds='raise,nan' delay=5"

``fraction`` of the devices (those with the lowest partition ids) misbehave on every training
reply, each with one kind, cycled over them: ``raise`` (the handler fails), ``slow`` (the reply
waits ``delay`` seconds), ``nan`` (one released value is NaN), ``garbage`` (the released array's
bytes are not an array). Like Flower's own mods (``LocalDpMod``), it wraps the call and edits the
reply; evaluation and u-shaped head steps pass unchanged.
"""

from __future__ import annotations

import os
import time

import numpy as np
from dataclasses import dataclass

from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from privtune_flwr import client_app as device_app

ENV = "PRIVTUNE_FAULTS"
KINDS = ("raise", "garbage", "nan", "slow")
# Poisoning (a hostile device that sends well-formed replies; not in the default cycle):
# ``poison``: every real token's value at POISON_VALUE (under the schema's max-abs, far outside any
# defence's envelope) and, vanilla, the labels flipped; ``flip``: an honest release with flipped
# labels (plausible: no envelope can tell; label noise, bounded by the cloud's clipping).
POISON_KINDS = ("poison", "flip")
POISON_VALUE = 9.9e5
FAULTY_TYPES = ("train", "train.forward")  # the releases of training data


@dataclass(frozen=True)
class FaultPlan:
    fraction: float = 0.0
    kinds: tuple[str, ...] = KINDS
    delay: float = 5.0  # seconds a "slow" device waits

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r} is outside the accepted range [0, 1]")
        if not self.kinds or any(k not in KINDS + POISON_KINDS for k in self.kinds):
            raise ValueError(f"kinds={','.join(self.kinds)!r} must be a comma-separated list of "
                             f"{', '.join(KINDS + POISON_KINDS)}")
        if not 0.0 <= self.delay <= 3600.0:
            raise ValueError(f"delay={self.delay!r} is outside the accepted range [0, 3600] seconds")

    @classmethod
    def from_env(cls, env=None) -> "FaultPlan":
        from flwr.common.config import parse_config_args

        text = (os.environ if env is None else env).get(ENV, "").strip()
        if not text:
            return cls()
        values = parse_config_args([text])
        unknown = set(values) - {"fraction", "kinds", "delay"}
        if unknown:
            raise ValueError(f"{ENV} names unknown keys {sorted(unknown)}; accepted: fraction, kinds, delay")
        kinds = tuple(k.strip() for k in str(values.get("kinds", ",".join(KINDS))).split(",") if k.strip())
        return cls(float(values.get("fraction", 0.0)), kinds, float(values.get("delay", 5.0)))

    def fault_of(self, pid: int, total: int) -> str | None:
        """The fault partition ``pid`` of ``total`` injects, or None."""
        if pid >= round(self.fraction * total):
            return None
        return self.kinds[pid % len(self.kinds)]


def fault_mod(plan: FaultPlan):
    """A Flower Mod that makes the devices ``plan`` names misbehave on their training replies."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type not in FAULTY_TYPES:
            return call_next(msg, context)
        pid, total = device_app.partition_ids(context.node_config)
        fault = plan.fault_of(pid, total)
        if fault == "raise":
            raise RuntimeError(f"injected fault: device {pid} crashes (fraction={plan.fraction:g})")
        reply = call_next(msg, context)
        if fault is None or reply.has_error():
            return reply
        if fault == "slow":
            time.sleep(plan.delay)
            return reply
        if fault in POISON_KINDS:
            return _poison(reply, fault)
        record = next(iter(reply.content.array_records.values()))
        key = next(iter(record.keys()))
        array = record[key].numpy().copy()
        if fault == "nan":
            array.flat[0] = float("nan")
            record[key] = Array(array)
        else:  # garbage: bytes that are no array at all
            record[key] = Array(dtype=array.dtype.str, shape=array.shape, stype="numpy.ndarray", data=b"\x00garbage" * 8)
        return reply

    return mod


def _poison(reply: Message, fault: str) -> Message:
    """A well-formed hostile reply: flipped labels (binary: 1 - y; else y + 1 mod the largest seen
    + 1) and, for ``poison``, every real token's coordinates at +-POISON_VALUE."""
    from privtune_flwr.schema import HIDDEN, LABELS, MASK

    for record in reply.content.array_records.values():
        if LABELS in record.keys():
            labels = record[LABELS].numpy().copy()
            top = max(1, int(labels.max(initial=0)))
            record[LABELS] = Array(((labels + 1) % (top + 1)).astype(labels.dtype) if top > 1 else (1 - labels).astype(labels.dtype))
        if fault == "poison" and HIDDEN in record.keys() and MASK in record.keys():
            hidden, mask = record[HIDDEN].numpy().copy(), record[MASK].numpy()
            sign = np.where(np.arange(hidden.shape[-1]) % 2 == 0, 1.0, -1.0).astype(hidden.dtype)
            hidden[mask == 1] = POISON_VALUE * sign
            record[HIDDEN] = Array(hidden)
    return reply


def faulty_app(plan: FaultPlan | None = None) -> ClientApp:
    """The product's device handlers, every one of them, behind :func:`fault_mod`."""
    plan = FaultPlan.from_env() if plan is None else plan
    app = ClientApp(mods=[fault_mod(plan)])
    for name in device_app.app._registered_funcs:  # "train.default", "evaluate.forward", ...
        category, action = name.split(".")
        getattr(app, category)(action)(lambda msg, context: device_app.app(msg, context))
    return app


app = faulty_app()
