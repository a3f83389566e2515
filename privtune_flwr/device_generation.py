"""Generation samples on the device (u-shaped): the cloud runs the middle, the device decodes.

``evaluate.prompt`` releases the prompts of the device's first test examples; each
``evaluate.next`` takes the middle's output at each sequence's last position, picks the next token
with the device's head and releases that token's representation only; ``evaluate.finish``
decodes, scores (ROUGE-L) and keeps the text on the device. Only the score goes back.
"""

from __future__ import annotations

import logging
import os

import torch
from flwr.app import ConfigRecord, Context, Message

from .device import generated_text, mean_rouge_l
from .device_runtime import admit
from .device_ushaped import load_head, u_prepare
from .schema import SchemaError, head_metrics_content, read_step, release_content

log = logging.getLogger(__name__)

GENERATED = "u-generated"  # context.state ConfigRecord: the sequences being generated


def _generated_path(pid: int):
    from pathlib import Path

    from .device_policy import HOME_ENV

    home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".local", "share", "privtune_flwr")
    return Path(home) / f"generated-{pid}.txt"


def evaluate_prompt(msg: Message, context: Context) -> Message:
    """Release the prompts of this device's first ``generation.samples`` test examples."""
    cfg, node, ledger = u_prepare(msg, context)
    if cfg.task != "generation":
        raise SchemaError("generation samples need data.task='generation'")
    server_round, step, _ = read_step(msg.content)
    count = min(cfg.generate_samples, len(node.test))
    if count == 0:
        raise SchemaError("this device has no test example to generate from")
    rows = node.test.select(range(count))
    budget = cfg.max_length - cfg.max_new_tokens
    ids = [seq[-budget:] for seq in node.device.encode(list(rows["prompt"]))]
    # a prompt is an example of its own (shorter than the test sequence it starts)
    releases = admit(cfg, context, node, ledger, ids, "evaluate", [])
    rel = node.device.release_ids(ids)
    rel.metrics["releases-per-example-max"] = releases
    context.state.config_records[GENERATED] = ConfigRecord(
        {"round": server_round, "step": step, "n": count, "prompt": [len(x) for x in ids],
         "ids": [i for seq in ids for i in seq]})
    return Message(content=release_content(rel.hidden, rel.attention_mask, None, rel.metrics, transport=cfg.transport_dtype), reply_to=msg)


def _generated(record) -> list[list[int]]:
    flat, out, at = list(record["ids"]), [], 0
    lengths = list(record["lengths"]) if "lengths" in record else list(record["prompt"])
    for n in lengths:
        out.append(flat[at:at + n])
        at += n
    return out


def evaluate_next(msg: Message, context: Context) -> Message:
    """The middle's output at each sequence's last position -> the next token (greedy, on the
    device); reply with the representation of that new token only (each token is released once:
    its noise is keyed by the text up to it)."""
    cfg, node, ledger = u_prepare(msg, context)
    record = context.state.config_records.get(GENERATED)
    if record is None:
        raise SchemaError("no generation is in progress on this device")
    count, d = int(record["n"]), node.device.split.hidden_size
    server_round, step, outputs = read_step(msg.content, shape=(count, 1, d), max_abs=node.head.max_abs)
    if (server_round, step) != (int(record["round"]), int(record["step"]) + 1):
        raise SchemaError(f"generation step {step} of round {server_round}; this device is at step {record['step']} (stale)")
    seqs = _generated(record)
    load_head(context, node.head)
    node.head.split.head.eval()
    with torch.no_grad():
        logits = node.head.split.head(outputs, torch.ones(count, 1, dtype=torch.long))[:, -1]
    for seq, token in zip(seqs, logits.argmax(-1).tolist()):
        seq.append(int(token))
    # each longer sequence is an example of its own (its new token's representation depends on
    # all of it): under the same budget as any other release (`none` has no noise to budget)
    if cfg.defense != "none":
        admit(cfg, context, node, ledger, seqs, "evaluate", [])
    rel = node.device.release_ids(seqs)
    last = rel.hidden[:, -1:].contiguous()  # decoders pad on the left: the last column is each new token
    record["step"], record["ids"] = step, [i for seq in seqs for i in seq]
    record["lengths"] = [len(seq) for seq in seqs]
    metrics = {"num-examples": float(count), "num-tokens": float(count)}
    return Message(content=release_content(last, torch.ones(count, 1, dtype=torch.long), None, metrics, transport=cfg.transport_dtype),
                   reply_to=msg)


def evaluate_finish(msg: Message, context: Context) -> Message:
    """Decode what was generated, score it (ROUGE-L against the references) and keep the text on
    the device (its log and ``generated-<partition>.txt``); only the score goes back."""
    cfg, node, _ = u_prepare(msg, context)
    record = context.state.config_records.pop(GENERATED, None)
    if record is None:
        raise SchemaError("no generation is in progress on this device")
    tok = node.device.split.tokenizer
    seqs, prompts = _generated(record), list(record["prompt"])
    texts = [generated_text(tok, seq, n) for seq, n in zip(seqs, prompts)]
    refs = [t.strip() for t in node.test.select(range(len(texts)))["target"]]
    rouge = mean_rouge_l(refs, texts)
    pid = int(context.node_config["partition-id"])
    path = _generated_path(pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for text, ref in zip(texts, refs):
            fh.write(f"round {record['round']}\tgenerated: {text}\treference: {ref}\n")
    log.info("device %d generated (kept on the device, %s): %s", pid, path, texts)
    return Message(content=head_metrics_content({"num-examples": float(len(texts)), "rouge-l": rouge}), reply_to=msg)
