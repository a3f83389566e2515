"""The u-shaped protocol on the device: it keeps its labels, its loss and its head.

``train.forward`` releases a batch without labels and keeps it pending; ``train.head`` takes the
middle's outputs for it, computes the loss on the device's own labels, steps the head and returns
the gradient with respect to the outputs (label protection from the run config, its randomness
from the device's key). ``evaluate.forward``/``evaluate.head`` score the test split the same way,
and only aggregate metrics go back.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from .config import RunConfig
from .data import round_indices
from .device import DeviceHead
from .device_runtime import admit, prepare, test_indices
from .schema import CONFIG, OUTPUTS, SchemaError, gradient_content, head_metrics_content, read_step, release_content

PENDING = "u-pending"  # context.state ConfigRecord: the release awaiting the middle's outputs
HEAD = "u-head"  # context.state ArrayRecord: this device's head weights and optimiser state


def load_head(context: Context, head: DeviceHead) -> None:
    """Put this device's head (weights, optimiser state) into the process's shared module."""
    record = context.state.array_records.get(HEAD)
    if record is None:  # first use: the seeded initial head, a fresh optimiser
        state = {k: v.clone() for k, v in head.initial.items()}
        head.load({"weights": state, "optimizer": None})
        return
    arrays = {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}
    weights = {k[len("w."):]: v for k, v in arrays.items() if k.startswith("w.")}
    optimizer = {k[len("o."):]: v for k, v in arrays.items() if k.startswith("o.")}
    head.load({"weights": weights, "optimizer": optimizer or None})


def save_head(context: Context, head: DeviceHead) -> None:
    state = head.dump()
    arrays = {f"w.{k}": Array(v.contiguous().numpy()) for k, v in state["weights"].items()}
    arrays.update({f"o.{k}": Array(v.contiguous().numpy()) for k, v in state["optimizer"].items()})
    context.state.array_records[HEAD] = ArrayRecord(arrays)


def u_prepare(msg: Message, context: Context):
    cfg, server_round, _, node, ledger = prepare(msg, context, records=(CONFIG, OUTPUTS))  # read_step checks exactly
    if cfg.protocol != "u-shaped":
        raise SchemaError(f"{msg.metadata.message_type!r} belongs to the u-shaped protocol; this run is {cfg.protocol!r}")
    return cfg, node, ledger


def u_texts(cfg: RunConfig, rows) -> list[str]:
    return list(rows["sequence"] if cfg.task == "generation" else rows["text"])


def u_forward(msg: Message, context: Context, phase: str) -> Message:
    cfg, node, ledger = u_prepare(msg, context)
    server_round, step, _ = read_step(msg.content)
    pid = int(context.node_config["partition-id"])
    if phase == "train":
        slot = (server_round - 1) * cfg.batches_per_round + step
        idx = round_indices(len(node.train), slot + 1, cfg.batch_size, cfg.seed * 1_000 + pid)
        rows = node.train.select(idx)
    else:
        idx = test_indices(cfg, node, pid)
        rows = node.test.select(idx)
    encoded = node.device.encode(u_texts(cfg, rows))
    releases = admit(cfg, context, node, ledger, encoded, phase, idx)
    rel = node.device.release_ids(encoded)  # labels stay here
    rel.metrics["releases-per-example-max"] = releases
    n, t = rel.attention_mask.shape
    context.state.config_records[PENDING] = ConfigRecord(
        {"phase": phase, "round": server_round, "step": step, "indices": idx, "n": n, "t": t})
    return Message(content=release_content(rel.hidden, rel.attention_mask, None, rel.metrics, transport=cfg.transport_dtype), reply_to=msg)


def u_head(msg: Message, context: Context, phase: str) -> Message:
    cfg, node, _ = u_prepare(msg, context)
    pending = context.state.config_records.get(PENDING)
    if pending is None or pending["phase"] != phase:
        raise SchemaError(f"no {phase} release is awaiting outputs on this device")
    shape = (int(pending["n"]), int(pending["t"]), node.device.split.hidden_size)
    server_round, step, outputs = read_step(msg.content, shape=shape, max_abs=node.head.max_abs)  # the head's public range
    if (server_round, step) != (int(pending["round"]), int(pending["step"])):
        raise SchemaError(f"outputs for round {server_round} step {step}; this device awaits round "
                          f"{pending['round']} step {pending['step']} (stale)")
    del context.state.config_records[PENDING]
    rows = (node.train if phase == "train" else node.test).select(list(pending["indices"]))
    ids = node.device.encode(u_texts(cfg, rows))
    mask = torch.zeros(len(ids), shape[1], dtype=torch.long)
    targets = torch.full((len(ids), shape[1]), node.device.split.tokenizer.pad_token_id or 0, dtype=torch.long)
    left = node.device.split.family == "decoder"
    for i, seq in enumerate(ids):  # the release's layout: left padding for decoders, right for encoders
        span = slice(shape[1] - len(seq), shape[1]) if left else slice(0, len(seq))
        mask[i, span], targets[i, span] = 1, torch.tensor(seq)
    if cfg.task == "classification":
        targets = torch.tensor(list(rows["label"]), dtype=torch.long)
    head = node.head
    load_head(context, head)
    if phase == "train":
        from .label_protection import from_config

        # the run config's protection, already checked against this device's floor (policy.check);
        # its randomness from this device's own key, never from the cloud
        head.protection = from_config(cfg, key=node.defense.key)
        grad, loss = head.step(outputs, mask, targets, token_ids=ids)
        save_head(context, head)
        return Message(content=gradient_content(grad, {"num-examples": shape[0], "loss": loss}), reply_to=msg)
    metrics = head.evaluate(outputs, mask, targets)
    keep = {k: metrics[k] for k in ("loss", "accuracy", "macro-f1", "perplexity") if k in metrics}
    return Message(content=head_metrics_content({"num-examples": shape[0], **keep}), reply_to=msg)


def train_forward(msg: Message, context: Context) -> Message:
    """u-shaped: release this step's batch (no labels); keep the batch to compute its loss."""
    return u_forward(msg, context, "train")


def train_head(msg: Message, context: Context) -> Message:
    """u-shaped: the middle's outputs for the pending batch -> loss on the device's own labels, a
    head update on the device, and the gradient with respect to the outputs back."""
    return u_head(msg, context, "train")


def evaluate_forward(msg: Message, context: Context) -> Message:
    return u_forward(msg, context, "evaluate")


def evaluate_head(msg: Message, context: Context) -> Message:
    """u-shaped: score the test release with the device's head; only aggregate metrics go back."""
    return u_head(msg, context, "evaluate")
