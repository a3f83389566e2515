"""The message schema shared by the device (ClientApp) and the cloud (strategy).

Vanilla protocol, one round::

    cloud -> device  "train" / "evaluate"   config  : ConfigRecord  {server-round, num-batches}
    device -> cloud  reply                  released: ArrayRecord   {hidden, attention-mask, labels}
                                            metrics : MetricRecord  {num-examples, num-tokens, ...}

Once per device, before it is first sampled::

    cloud -> device  "query"                (empty)
    device -> cloud  reply                  device  : MetricRecord  {partition-id, num-partitions}

so that the cloud orders devices by their data partition, not by the node ids Flower draws at
random for every run (a seeded run then samples and trains in the same order each time).

Nothing else travels: no token ids, no text, no anchors of the device's tokens. The cloud
checks every reply against this schema (:func:`parse_release`) and rejects anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

CONFIG = "config"
RELEASED = "released"
METRICS = "metrics"
DEVICE = "device"

HIDDEN = "hidden"  # float32 [N, T, d], zero at padding
MASK = "attention-mask"  # int8 [N, T], 1 = real token
LABELS = "labels"  # int64 [N]
RELEASE_ARRAYS = {HIDDEN: np.dtype("float32"), MASK: np.dtype("int8"), LABELS: np.dtype("int64")}

# Device metrics: all numbers about the device's own computation, none about its tokens.
REQUIRED_METRICS = ("num-examples", "num-tokens")
OPTIONAL_METRICS = (
    "self-audit-knn",  # KNN top-1 token recovery on this release (the device knows the truth)
    "bytes-sent",
    "bottom-seconds",
    "defense-seconds",
    "epsilon-effective-min",
    "epsilon-effective-median",
    "epsilon-effective-max",
    "slack-max",
    "epsilon-per-sequence-max",
    "slack-per-sequence-max",
    "releases-per-example-max",  # how often any one of the released examples has now been released
)


class SchemaError(ValueError):
    """A reply that does not follow the schema; the message says what is wrong."""


@dataclass
class Release:
    hidden: torch.Tensor  # [N, T, d] float32
    attention_mask: torch.Tensor  # [N, T] long
    labels: torch.Tensor  # [N] long
    metrics: dict[str, float]

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


def instruction(server_round: int, num_batches: int) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({"server-round": int(server_round), "num-batches": int(num_batches)})})


def read_instruction(content: RecordDict) -> tuple[int, int]:
    if CONFIG not in content.config_records:
        raise SchemaError(f"instruction lacks the {CONFIG!r} ConfigRecord")
    config = content.config_records[CONFIG]
    try:
        server_round, num_batches = int(config["server-round"]), int(config["num-batches"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"instruction config is malformed: {exc}") from None
    if num_batches < 0:
        raise SchemaError(f"num-batches={num_batches} must be >= 0")
    return server_round, num_batches


def release_content(hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, metrics: dict[str, float]) -> RecordDict:
    """Pack a device release. ``hidden`` must already be zero at padding."""
    arrays = ArrayRecord(
        {
            HIDDEN: Array(hidden.detach().to(torch.float32).contiguous().numpy()),
            MASK: Array(attention_mask.detach().to(torch.int8).contiguous().numpy()),
            LABELS: Array(labels.detach().to(torch.int64).contiguous().numpy()),
        }
    )
    unknown = set(metrics) - set(REQUIRED_METRICS) - set(OPTIONAL_METRICS)
    if unknown:
        raise SchemaError(f"metrics {sorted(unknown)} are not part of the schema")
    return RecordDict({RELEASED: arrays, METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})


def parse_release(content: RecordDict, *, hidden_size: int, num_labels: int) -> Release:
    """Validate a device reply and return its tensors; raise :class:`SchemaError` otherwise."""
    if set(content.keys()) != {RELEASED, METRICS}:
        raise SchemaError(f"reply records {sorted(content.keys())} differ from the schema's {[METRICS, RELEASED]}")
    if RELEASED not in content.array_records or METRICS not in content.metric_records:
        raise SchemaError(f"reply needs ArrayRecord {RELEASED!r} and MetricRecord {METRICS!r}")
    record = content.array_records[RELEASED]
    if set(record.keys()) != set(RELEASE_ARRAYS):
        raise SchemaError(f"release arrays {sorted(record.keys())} differ from the schema's {sorted(RELEASE_ARRAYS)}")
    arrays = {}
    for key, dtype in RELEASE_ARRAYS.items():
        if np.dtype(record[key].dtype) != dtype:
            raise SchemaError(f"{key} has dtype {record[key].dtype}; the schema says {dtype}")
        arrays[key] = record[key].numpy()
    hidden, mask, labels = arrays[HIDDEN], arrays[MASK], arrays[LABELS]
    if hidden.ndim != 3 or hidden.shape[2] != hidden_size:
        raise SchemaError(f"hidden has shape {hidden.shape}; expected [N, T, {hidden_size}]")
    n, t = hidden.shape[:2]
    if n == 0 or t == 0:
        raise SchemaError(f"release is empty (hidden shape {hidden.shape})")
    if mask.shape != (n, t) or labels.shape != (n,):
        raise SchemaError(f"attention-mask {mask.shape} / labels {labels.shape} do not match hidden {hidden.shape}")
    if not np.isfinite(hidden).all():
        raise SchemaError(f"hidden holds {int((~np.isfinite(hidden)).sum())} non-finite values")
    if not np.isin(mask, (0, 1)).all() or (mask.sum(1) == 0).any():
        raise SchemaError("attention-mask must be 0/1 with at least one real token per sequence")
    if np.abs(hidden[mask == 0]).max(initial=0.0) != 0.0:
        raise SchemaError("hidden is not zero at padding positions")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise SchemaError(f"labels span {labels.min()}..{labels.max()}; accepted: 0..{num_labels - 1}")
    metrics = dict(content.metric_records[METRICS])
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    unknown = sorted(set(metrics) - set(REQUIRED_METRICS) - set(OPTIONAL_METRICS))
    if missing or unknown:
        raise SchemaError(f"metrics: missing {missing}, not in the schema {unknown}")
    if int(metrics["num-examples"]) != n:
        raise SchemaError(f"num-examples={metrics['num-examples']} but the release holds {n} sequences")
    return Release(
        hidden=torch.from_numpy(hidden.copy()),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        labels=torch.from_numpy(labels.copy()),
        metrics={k: float(v) for k, v in metrics.items()},
    )


def device_identity(partition_id: int, num_partitions: int) -> RecordDict:
    """A device's answer to the cloud's query: which partition of the data it holds."""
    return RecordDict({DEVICE: MetricRecord({"partition-id": int(partition_id), "num-partitions": int(num_partitions)})})


def read_device_identity(content: RecordDict) -> int:
    """The partition id in a device's answer; :class:`SchemaError` if the answer is malformed."""
    if set(content.keys()) != {DEVICE} or DEVICE not in content.metric_records:
        raise SchemaError(f"identity reply records {sorted(content.keys())} differ from the schema's [{DEVICE!r}]")
    record = content.metric_records[DEVICE]
    try:
        pid, total = int(record["partition-id"]), int(record["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"identity reply is malformed: {exc}") from None
    if not 0 <= pid < total:
        raise SchemaError(f"partition-id={pid} is outside 0..{total - 1}")
    return pid
