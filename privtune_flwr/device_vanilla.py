"""The vanilla protocol on the device: each round's batches and the test split, released defended
with their labels (the cloud holds the whole top). An offsite run's adapters also arrive here."""

from __future__ import annotations

from flwr.app import Context, Message

from .data import round_indices
from .device_runtime import admit, prepare, test_indices
from .schema import SchemaError, release_content


def release(msg: Message, context: Context, phase: str) -> Message:
    """One vanilla reply: this round's training batches, or the test split, released defended."""
    cfg, server_round, num_batches, node, ledger = prepare(msg, context)
    if cfg.protocol != "vanilla":
        raise SchemaError(f"a plain {phase!r} instruction belongs to the vanilla protocol; this run is {cfg.protocol!r}")
    if phase == "train":
        idx = round_indices(len(node.train), server_round, max(1, num_batches) * cfg.batch_size, cfg.seed * 1_000 + int(context.node_config["partition-id"]))
        rows = node.train.select(idx)
    else:
        idx = test_indices(cfg, node, int(context.node_config["partition-id"]))
        rows = node.test.select(idx)
    encoded = node.device.encode(rows["text"])
    releases = admit(cfg, context, node, ledger, encoded, phase, idx)
    rel = node.device.release_ids(encoded, rows["label"])
    rel.metrics["releases-per-example-max"] = releases
    return Message(content=release_content(rel.hidden, rel.attention_mask, rel.labels, rel.metrics, transport=cfg.transport_dtype), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Release this round's batches: defended representations, mask and labels."""
    if context.run_config.get("federation.protocol") == "offsite":  # adapters travel, no representation (privtune_flwr.offsite)
        from .offsite import device_train

        return device_train(msg, context)
    return release(msg, context, "train")


def evaluate(msg: Message, context: Context) -> Message:
    """Release this device's test split (defended, as at inference) for the cloud to score."""
    if context.run_config.get("federation.protocol") == "offsite":  # the device scores the plugged-in adapters itself
        from .offsite import device_evaluate

        return device_evaluate(msg, context)
    return release(msg, context, "evaluate")
