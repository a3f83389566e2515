"""The device: a Flower ClientApp that releases defended representations of its private text.

Drop-in for deployments: ``flower-supernode --node-config "partition-id=0 num-partitions=2"``
serves ``privtune_flwr.client_app:app``. In simulation Flower sets the same two keys.

Per process (a Ray actor serves many simulated devices) the frozen bottom, the defence tables
and the dataset are cached; per device, its reading position lives in ``context.state``.

The device trusts nothing the cloud sends. Its noise comes from its own secret key (OS entropy;
kept in ``context.state`` when simulated, in a private key file otherwise), never from the run
config, the round or the message; each example is released once (the same tensor on every
re-send). Its privacy floor comes from its own node config (:mod:`privtune_flwr.device_policy`):
a run config asking for less gets an error reply that names the floor.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import secrets
import sys
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from . import data
from .data import partition_ids, round_indices  # noqa: F401 - also this module's names
from .accounting import ReleaseBudgetExceeded, ReleaseLedger
from .config import RunConfig
from .defenses import Defense
from .device import DeviceHead, DeviceSide, device_defense, generated_text, mean_rouge_l
from .device_policy import DevicePolicy, PolicyError
from .mechanism.noise_key import NoiseKey
from .models import SplitModel, load_split
from .schema import (CONFIG, OUTPUTS, SchemaError, device_identity, gradient_content, head_metrics_content, read_instruction,
                     read_step, release_content)

log = logging.getLogger(__name__)

app = ClientApp()

STATE = "device-state"  # context.state ConfigRecord: {"evaluations", "sent"}
SECRET = "device-secret"  # context.state ConfigRecord {"key": bytes}: a simulated device's noise key
LEDGER = "device-ledger"  # context.state ConfigRecord {"ledger": bytes}: its release ledger (the run's lifetime)

_SPLITS: dict[tuple, SplitModel] = {}  # the frozen bottom, one per model configuration and process
# Devices a process has set up, least recently used first. A Ray actor may serve thousands of
# simulated devices; each keeps its partition views and its defence's small tables here, and one
# evicted is set up again from the process-wide caches (data, partitioner, bottom, anchor tables).
NODE_CACHE = 256
_NODES: collections.OrderedDict[tuple, "Node"] = collections.OrderedDict()


@dataclass
class Node:
    """One device's view: its partitions and its defended bottom."""

    train: object  # datasets.Dataset
    test: object
    device: DeviceSide
    defense: Defense
    head: DeviceHead | None = None  # u-shaped: the head's module, shared by the devices a process serves
    map_digest: str = ""  # federation scope: the digest of the kept map its defence holds


def _split(cfg: RunConfig, num_labels: int) -> SplitModel:
    key = (cfg.model, cfg.split_layer, cfg.task, num_labels, cfg.protocol, cfg.lora_rank, cfg.lora_targets, cfg.seed)
    if key not in _SPLITS:
        if cfg.protocol == "vanilla":  # the device never trains: its copy carries no LoRA
            split = load_split(cfg.model, cfg.split_layer, cfg.task, num_labels, lora_rank=0, seed=cfg.seed, **cfg.device_placement())
        else:  # the device trains its head (a LoRA on a tied lm_head); it holds no middle
            split = load_split(cfg.model, cfg.split_layer, cfg.task, num_labels, lora_rank=cfg.lora_rank, seed=cfg.seed,
                               protocol="u-shaped", lora_targets=cfg.lora_targets, **cfg.device_placement()).without_middle()
        _SPLITS[key] = split
    return _SPLITS[key]


FITTED = "device-fit"  # context.state ArrayRecord: this device's own label map (device scope), kept across actors
FITTED_ABOUT = "device-fit-inputs"  # context.state ConfigRecord: what it was fitted on (one key space per RecordDict)


def _fit_inputs(cfg: RunConfig, pid: int, total: int) -> str:
    """What a device's own label map is a function of: a stored map fitted for other inputs is refitted."""
    return repr((cfg.model, cfg.split_layer, cfg.dataset, cfg.max_examples, cfg.test_fraction, cfg.partitioner,
                 cfg.dirichlet_alpha, cfg.seed, pid, total, cfg.subspace_rank, cfg.subspace_fit, cfg.max_length))


def _stored_subspace(state: RecordDict | None, inputs: str):
    """The label map this device fitted earlier in the run (any actor), if it was fitted on ``inputs``."""
    if state is None or FITTED not in state.array_records or FITTED_ABOUT not in state.config_records:
        return None
    about = state.config_records[FITTED_ABOUT]
    if about.get("inputs") != inputs:
        return None
    from .mechanism.subspace import Subspace

    arrays = {k: torch.from_numpy(v.numpy().copy()) for k, v in state.array_records[FITTED].items()}
    return Subspace(arrays["center"], arrays["basis"], arrays["special_ids"], arrays["special"],
                    float(about["reader-accuracy"]))


def _store_subspace(state: RecordDict | None, inputs: str, defense: Defense) -> None:
    """Keep a freshly fitted label map in the device's state (a few KB): a simulated device served
    by another Ray actor later restores it instead of fitting again (7-11 s for MiniLM), and its
    releases stay bit-identical (the same map, so the same mechanism digest)."""
    if state is None or not hasattr(defense, "basis"):
        return
    arrays = {"center": defense.center, "basis": defense.basis, "special_ids": defense.special_ids,
              "special": defense.special_values}
    state.array_records[FITTED] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in arrays.items()})
    state.config_records[FITTED_ABOUT] = ConfigRecord({"inputs": inputs, "reader-accuracy": float(defense.reader_accuracy)})


def load_node(cfg: RunConfig, pid: int, total: int, state: RecordDict | None = None) -> Node:
    """This device's view for ``cfg``: from the process's cache, else built. ``state`` (the
    device's ``context.state``): where its own label map is kept across the actors that serve it."""
    key = (cfg, pid, total)
    if key in _NODES:
        _NODES.move_to_end(key)
        return _NODES[key]
    ds = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=cfg.max_examples or None)
    if ds.task != cfg.task:
        raise ValueError(f"dataset={cfg.dataset!r} is a {ds.task} task; the run config says task={cfg.task!r}")
    if cfg.task == "classification" and ds.num_labels != cfg.num_labels:
        raise ValueError(f"dataset={cfg.dataset!r} has {ds.num_labels} labels; the run config says num-labels={cfg.num_labels}")
    split = _split(cfg, ds.num_labels)
    if cfg.task == "generation":  # a device fine-tunes on prompt + continuation
        def joined(rows):
            pairs = [data.generation_pair(cfg.dataset, t, g) for t, g in zip(rows["text"], rows["target"])]
            return rows.add_column("sequence", [p + c for p, c in pairs]).add_column("prompt", [p for p, _ in pairs])

        ds = data.TextDataset(ds.name, ds.task, joined(ds.train), joined(ds.test), ds.label_names, ds.attributes)
    train = data.partition(ds.train, total, pid, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    # A federation with more devices than test rows shares them out round the devices: every
    # device still evaluates one row or more, and any sample of devices scores an iid sample.
    shares = min(total, len(ds.test))
    test = data.partition(ds.test, shares, pid % shares, partitioner="iid", seed=cfg.seed)
    if len(train) == 0:
        raise ValueError(f"partition {pid} of {total} of {cfg.dataset!r} is empty; use fewer devices")
    # The key is set per message (device_key); the placeholder here is never used to release.
    texts = train["sequence"] if cfg.task == "generation" else train["text"]
    labels = None if cfg.task == "generation" else train["label"]
    if cfg.federated_map():  # the map comes from the federation's statistics (query.map), not from this share
        from .federated_map import NoMap

        defense = NoMap()
    else:
        options, inputs, stored = cfg.defense_options(), _fit_inputs(cfg, pid, total), None
        if cfg.defense == "label-subspace":
            stored = _stored_subspace(state, inputs)
            if stored is not None:
                options["subspace"] = stored
        defense = device_defense(cfg.defense, split, epsilon=cfg.epsilon, texts=texts, labels=labels,
                                 task=cfg.task, max_length=cfg.max_length, release=cfg.release, **options)
        if cfg.defense == "label-subspace" and stored is None:
            _store_subspace(state, inputs, defense)
    anchors = getattr(defense, "anchors", None)
    if anchors is None and cfg.audit_tokens:
        from .mechanism.anchors import get_tables

        anchors = get_tables(split, k=cfg.k, n_hops=cfg.n_hops, max_neighbours=cfg.max_neighbours).anchors
    head = DeviceHead(split, learning_rate=cfg.learning_rate) if cfg.protocol == "u-shaped" else None
    node = Node(train, test, DeviceSide(split, defense, max_length=cfg.max_length, audit_tokens=cfg.audit_tokens, anchors=anchors),
                defense, head)
    _NODES[key] = node
    while len(_NODES) > NODE_CACHE:
        _NODES.popitem(last=False)
    return node


def simulated() -> bool:
    """True inside a Flower simulation (the ClientApp runs in a Ray actor)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


_FILE_KEYS: dict[str, tuple[NoiseKey, ReleaseLedger]] = {}


def device_key(context: Context, policy: DevicePolicy, cfg: RunConfig, pid: int) -> tuple[NoiseKey, ReleaseLedger]:
    """This device's noise key and its release ledger (the per-example release budget).

    The key is never derived from anything the cloud supplies, except with ``reproducible-noise``,
    which the device's own policy must allow (checked before this is called). A key kept in a file
    has its ledger beside it, for the device's lifetime; a key kept in memory has its ledger in
    ``context.state``, for the run's lifetime."""
    budget = policy.max_releases_per_example
    in_memory = cfg.reproducible_noise or policy.key_store == "memory" or (
        policy.key_store == "auto" and simulated() and not policy.key_file)
    if in_memory:
        if cfg.reproducible_noise:
            key = NoiseKey.from_seed(f"{cfg.seed}/{pid}")
        else:
            record = context.state.config_records.get(SECRET)
            if record is None:
                record = context.state.config_records[SECRET] = ConfigRecord({"key": NoiseKey.fresh().to_state()})
            key = NoiseKey.from_state(bytes(record["key"]))
        kept = context.state.config_records.get(LEDGER)
        return key, ReleaseLedger(budget, data=None if kept is None else bytes(kept["ledger"]))
    path = policy.key_path(pid)
    if str(path) not in _FILE_KEYS:
        _FILE_KEYS[str(path)] = (NoiseKey.load_or_create(path),
                                 ReleaseLedger(budget, path.with_name(path.name + ".ledger.json")))
    key, ledger = _FILE_KEYS[str(path)]
    ledger.budget = budget  # the device's policy of this moment (its node config may have changed)
    return key, ledger


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        context.state.config_records[STATE] = ConfigRecord({"evaluations": 0})
    return context.state.config_records[STATE]


def _count_sends(context: Context, size: int, idx: list[int]) -> int:
    """``defense='none'``: how often any of ``idx`` has now been sent (the device's own tally)."""
    state = _state(context)
    counts = list(state.get("sent", [0] * size))
    for i in idx:
        counts[i] += 1
    state["sent"] = counts
    return max(counts[i] for i in idx)


def _prepare(msg: Message, context: Context, *, records: tuple[str, ...] = (CONFIG,)) -> tuple[RunConfig, int, int, Node, ReleaseLedger]:
    """Everything a handler needs, after the device's own checks: the run config against its
    floor, the instruction's shape and size, and its key (never derived from the message)."""
    cfg = RunConfig.from_flower(context.run_config)
    pid, total = partition_ids(context.node_config)
    policy = DevicePolicy.from_sources(context.node_config)
    policy.check(cfg)  # before anything is loaded or released
    server_round, num_batches = read_instruction(msg.content, records=records)
    policy.check_batches(max(1, num_batches))
    if msg.metadata.message_type == "train":  # vanilla: this round's batches
        policy.check_examples(max(1, num_batches) * cfg.batch_size, f"{max(1, num_batches)} batches of {cfg.batch_size}")
    elif msg.metadata.message_type == "train.forward":  # u-shaped: one batch per step
        policy.check_examples(cfg.batch_size, f"a batch of {cfg.batch_size}")
    node = load_node(cfg, pid, total, context.state)
    if msg.metadata.message_type in ("evaluate", "evaluate.forward"):  # the test examples it reads
        count = min(len(node.test), cfg.eval_examples or len(node.test))
        policy.check_examples(count, f"{count} test examples")
    key, ledger = device_key(context, policy, cfg, pid)
    if cfg.federated_map():
        _use_federated_map(cfg, context, node, key)
    node.defense.key = key
    node.device.time_limit = policy.max_instruction_seconds
    return cfg, server_round, num_batches, node, ledger


def _admit(cfg: RunConfig, context: Context, node: Node, ledger: ReleaseLedger, encoded: list[list[int]],
           phase: str, idx: list[int]) -> int:
    """Check the release budget for the examples ``encoded`` before any of them is computed, and
    record them; returns this device's ``releases-per-example-max`` (a per-device bound)."""
    if cfg.defense == "none":  # no noise, no budget: every send is the same clean representation
        if phase == "train":
            return _count_sends(context, len(node.train), idx)
        state = _state(context)
        state["evaluations"] = int(state["evaluations"]) + 1  # the same test split each time
        return int(state["evaluations"])
    key = node.defense.key
    try:
        most = ledger.admit(node.defense.fingerprint().hex(), [key.example_id(e) for e in encoded],
                            fresh=cfg.release == "fresh")
    except ReleaseBudgetExceeded as exc:
        raise PolicyError(str(exc)) from None
    if ledger.path is None:  # kept with the device's state, for the run's lifetime
        context.state.config_records[LEDGER] = ConfigRecord({"ledger": ledger.to_bytes()})
    return most


def _test_indices(cfg: RunConfig, node: Node, pid: int) -> list[int]:
    if len(node.test) == 0:
        raise ValueError(f"partition {pid} has no test examples")
    return list(range(min(len(node.test), cfg.eval_examples or len(node.test))))


def _release(msg: Message, context: Context, phase: str) -> Message:
    """One vanilla reply: this round's training batches, or the test split, released defended."""
    cfg, server_round, num_batches, node, ledger = _prepare(msg, context)
    if cfg.protocol != "vanilla":
        raise SchemaError(f"a plain {phase!r} instruction belongs to the vanilla protocol; this run is {cfg.protocol!r}")
    if phase == "train":
        idx = round_indices(len(node.train), server_round, max(1, num_batches) * cfg.batch_size, cfg.seed * 1_000 + int(context.node_config["partition-id"]))
        rows = node.train.select(idx)
    else:
        idx = _test_indices(cfg, node, int(context.node_config["partition-id"]))
        rows = node.test.select(idx)
    encoded = node.device.encode(rows["text"])
    releases = _admit(cfg, context, node, ledger, encoded, phase, idx)
    rel = node.device.release_ids(encoded, rows["label"])
    rel.metrics["releases-per-example-max"] = releases
    return Message(content=release_content(rel.hidden, rel.attention_mask, rel.labels, rel.metrics, transport=cfg.transport_dtype), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Release this round's batches: defended representations, mask and labels."""
    if context.run_config.get("protocol") == "offsite":  # adapters travel, no representation (privtune_flwr.offsite)
        from .offsite import device_train

        return device_train(msg, context)
    return _release(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Release this device's test split (defended, as at inference) for the cloud to score."""
    if context.run_config.get("protocol") == "offsite":  # the device scores the plugged-in adapters itself
        from .offsite import device_evaluate

        return device_evaluate(msg, context)
    return _release(msg, context, "evaluate")


# ------------------------------------------------------------------------------------------------
# u-shaped protocol: the device keeps its labels, its loss and its head
# ------------------------------------------------------------------------------------------------

PENDING = "u-pending"  # context.state ConfigRecord: the release awaiting the middle's outputs
HEAD = "u-head"  # context.state ArrayRecord: this device's head weights and optimiser state
GENERATED = "u-generated"  # context.state ConfigRecord: the sequences being generated


def _load_head(context: Context, head: DeviceHead) -> None:
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


def _save_head(context: Context, head: DeviceHead) -> None:
    state = head.dump()
    arrays = {f"w.{k}": Array(v.contiguous().numpy()) for k, v in state["weights"].items()}
    arrays.update({f"o.{k}": Array(v.contiguous().numpy()) for k, v in state["optimizer"].items()})
    context.state.array_records[HEAD] = ArrayRecord(arrays)


def _u_prepare(msg: Message, context: Context):
    cfg, server_round, _, node, ledger = _prepare(msg, context, records=(CONFIG, OUTPUTS))  # read_step checks exactly
    if cfg.protocol != "u-shaped":
        raise SchemaError(f"{msg.metadata.message_type!r} belongs to the u-shaped protocol; this run is {cfg.protocol!r}")
    return cfg, node, ledger


def _u_texts(cfg: RunConfig, rows) -> list[str]:
    return list(rows["sequence"] if cfg.task == "generation" else rows["text"])


def _u_forward(msg: Message, context: Context, phase: str) -> Message:
    cfg, node, ledger = _u_prepare(msg, context)
    server_round, step, _ = read_step(msg.content)
    pid = int(context.node_config["partition-id"])
    if phase == "train":
        slot = (server_round - 1) * cfg.batches_per_round + step
        idx = round_indices(len(node.train), slot + 1, cfg.batch_size, cfg.seed * 1_000 + pid)
        rows = node.train.select(idx)
    else:
        idx = _test_indices(cfg, node, pid)
        rows = node.test.select(idx)
    encoded = node.device.encode(_u_texts(cfg, rows))
    releases = _admit(cfg, context, node, ledger, encoded, phase, idx)
    rel = node.device.release_ids(encoded)  # labels stay here
    rel.metrics["releases-per-example-max"] = releases
    n, t = rel.attention_mask.shape
    context.state.config_records[PENDING] = ConfigRecord(
        {"phase": phase, "round": server_round, "step": step, "indices": idx, "n": n, "t": t})
    return Message(content=release_content(rel.hidden, rel.attention_mask, None, rel.metrics, transport=cfg.transport_dtype), reply_to=msg)


def _u_head(msg: Message, context: Context, phase: str) -> Message:
    cfg, node, _ = _u_prepare(msg, context)
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
    ids = node.device.encode(_u_texts(cfg, rows))
    mask = torch.zeros(len(ids), shape[1], dtype=torch.long)
    targets = torch.full((len(ids), shape[1]), node.device.split.tokenizer.pad_token_id or 0, dtype=torch.long)
    left = node.device.split.family == "decoder"
    for i, seq in enumerate(ids):  # the release's layout: left padding for decoders, right for encoders
        span = slice(shape[1] - len(seq), shape[1]) if left else slice(0, len(seq))
        mask[i, span], targets[i, span] = 1, torch.tensor(seq)
    if cfg.task == "classification":
        targets = torch.tensor(list(rows["label"]), dtype=torch.long)
    head = node.head
    _load_head(context, head)
    if phase == "train":
        from .label_protection import from_config

        # the run config's protection, already checked against this device's floor (policy.check);
        # its randomness from this device's own key, never from the cloud
        head.protection = from_config(cfg, key=node.defense.key)
        grad, loss = head.step(outputs, mask, targets, token_ids=ids)
        _save_head(context, head)
        return Message(content=gradient_content(grad, {"num-examples": shape[0], "loss": loss}), reply_to=msg)
    metrics = head.evaluate(outputs, mask, targets)
    keep = {k: metrics[k] for k in ("loss", "accuracy", "macro-f1", "perplexity") if k in metrics}
    return Message(content=head_metrics_content({"num-examples": shape[0], **keep}), reply_to=msg)


@app.train("forward")
def train_forward(msg: Message, context: Context) -> Message:
    """u-shaped: release this step's batch (no labels); keep the batch to compute its loss."""
    return _u_forward(msg, context, "train")


@app.train("head")
def train_head(msg: Message, context: Context) -> Message:
    """u-shaped: the middle's outputs for the pending batch -> loss on the device's own labels, a
    head update on the device, and the gradient with respect to the outputs back."""
    return _u_head(msg, context, "train")


@app.evaluate("forward")
def evaluate_forward(msg: Message, context: Context) -> Message:
    return _u_forward(msg, context, "evaluate")


@app.evaluate("head")
def evaluate_head(msg: Message, context: Context) -> Message:
    """u-shaped: score the test release with the device's head; only aggregate metrics go back."""
    return _u_head(msg, context, "evaluate")


# -- generation samples: the cloud runs the middle, the device decodes and keeps the text ----------


def _generated_path(pid: int):
    from pathlib import Path

    from .device_policy import HOME_ENV

    home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".local", "share", "privtune_flwr")
    return Path(home) / f"generated-{pid}.txt"


@app.evaluate("prompt")
def evaluate_prompt(msg: Message, context: Context) -> Message:
    """Release the prompts of this device's first ``generate-samples`` test examples."""
    cfg, node, ledger = _u_prepare(msg, context)
    if cfg.task != "generation":
        raise SchemaError("generation samples need task='generation'")
    server_round, step, _ = read_step(msg.content)
    count = min(cfg.generate_samples, len(node.test))
    if count == 0:
        raise SchemaError("this device has no test example to generate from")
    rows = node.test.select(range(count))
    budget = cfg.max_length - cfg.max_new_tokens
    ids = [seq[-budget:] for seq in node.device.encode(list(rows["prompt"]))]
    # a prompt is an example of its own (shorter than the test sequence it starts)
    releases = _admit(cfg, context, node, ledger, ids, "evaluate", [])
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


@app.evaluate("next")
def evaluate_next(msg: Message, context: Context) -> Message:
    """The middle's output at each sequence's last position -> the next token (greedy, on the
    device); reply with the representation of that new token only (each token is released once:
    its noise is keyed by the text up to it)."""
    cfg, node, ledger = _u_prepare(msg, context)
    record = context.state.config_records.get(GENERATED)
    if record is None:
        raise SchemaError("no generation is in progress on this device")
    count, d = int(record["n"]), node.device.split.hidden_size
    server_round, step, outputs = read_step(msg.content, shape=(count, 1, d), max_abs=node.head.max_abs)
    if (server_round, step) != (int(record["round"]), int(record["step"]) + 1):
        raise SchemaError(f"generation step {step} of round {server_round}; this device is at step {record['step']} (stale)")
    seqs = _generated(record)
    _load_head(context, node.head)
    node.head.split.head.eval()
    with torch.no_grad():
        logits = node.head.split.head(outputs, torch.ones(count, 1, dtype=torch.long))[:, -1]
    for seq, token in zip(seqs, logits.argmax(-1).tolist()):
        seq.append(int(token))
    # each longer sequence is an example of its own (its new token's representation depends on
    # all of it): under the same budget as any other release (`none` has no noise to budget)
    if cfg.defense != "none":
        _admit(cfg, context, node, ledger, seqs, "evaluate", [])
    rel = node.device.release_ids(seqs)
    last = rel.hidden[:, -1:].contiguous()  # decoders pad on the left: the last column is each new token
    record["step"], record["ids"] = step, [i for seq in seqs for i in seq]
    record["lengths"] = [len(seq) for seq in seqs]
    metrics = {"num-examples": float(count), "num-tokens": float(count)}
    return Message(content=release_content(last, torch.ones(count, 1, dtype=torch.long), None, metrics, transport=cfg.transport_dtype),
                   reply_to=msg)


@app.evaluate("finish")
def evaluate_finish(msg: Message, context: Context) -> Message:
    """Decode what was generated, score it (ROUGE-L against the references) and keep the text on
    the device (its log and ``generated-<partition>.txt``); only the score goes back."""
    cfg, node, _ = _u_prepare(msg, context)
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


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which data partition this device holds; the cloud orders devices by it."""
    if len(msg.content.keys()):
        raise SchemaError(f"the identity query carries records {sorted(msg.content.keys())}; it carries none")
    return Message(content=device_identity(*partition_ids(context.node_config)), reply_to=msg)


# -- the federation's label map (privtune_flwr.federated_map) ----------------------------------------

_ROWS: dict[tuple, tuple] = {}  # (cfg, pid, total) -> the clean training rows the fit and the audit read


def _map_prepare(msg: Message, context: Context):
    cfg = RunConfig.from_flower(context.run_config)
    pid, total = partition_ids(context.node_config)
    policy = DevicePolicy.from_sources(context.node_config)
    policy.check(cfg)
    if not cfg.federated_map():
        raise SchemaError(f"{msg.metadata.message_type!r} belongs to defense='label-subspace' with "
                          f"subspace-fit-scope='federation'; this run has defense={cfg.defense!r}, "
                          f"subspace-fit-scope={cfg.subspace_fit_scope!r}")
    node = load_node(cfg, pid, total)
    key = (cfg, pid, total)
    if key not in _ROWS:
        from .device import _clean_rows

        _ROWS[key] = _clean_rows(node.device.split, node.train["text"], node.train["label"], max_length=cfg.max_length,
                                 chunk=256)
    return cfg, policy, node, _ROWS[key], pid


def _derive(cfg: RunConfig, node: Node, stats, key: NoiseKey, weights=None):
    from .federated_map import derive_subspace

    split = node.device.split
    subspace = derive_subspace(stats, cfg.subspace_rank, special_ids=split.special_ids, weights=weights)
    return device_defense("label-subspace", split, epsilon=cfg.epsilon, texts=[], labels=[], max_length=cfg.max_length,
                          release=cfg.release, key=key, subspace=subspace, subspace_rank=cfg.subspace_rank)


def _map_arrays(defense: Defense) -> dict:
    """The derived map a device keeps in its state: centre, basis and special constants (about 12 KB
    for MiniLM, against 1.2 MB for the aggregate it was derived from)."""
    arrays = {"center": defense.center, "basis": defense.basis, "special_ids": defense.special_ids,
              "special": defense.special_values}
    return {k: v.detach().cpu().contiguous().numpy() for k, v in arrays.items()}


def _map_digest(arrays: dict) -> str:
    import hashlib

    return hashlib.sha256(b"".join(arrays[k].tobytes() for k in ("center", "basis", "special_ids", "special"))).hexdigest()


def _use_federated_map(cfg: RunConfig, context: Context, node: Node, key: NoiseKey) -> None:
    """Put the map this device accepted (kept in its own state) into its defence, restoring it from
    the kept map where this process has not yet (the audit is not rerun: it passed)."""
    from .federated_map import AGGREGATE, AUDIT
    from .mechanism.subspace import Subspace

    record, audit = context.state.array_records.get(AGGREGATE), context.state.config_records.get(AUDIT)
    if record is None or audit is None:
        raise PolicyError("this device holds no accepted federation label map (subspace-fit-scope='federation'): "
                          "it releases nothing until the map's statistics arrive (query.map) and its own audit passes")
    if node.map_digest == str(audit["map-digest"]):
        return
    arrays = {k: v.numpy().copy() for k, v in record.items()}
    if sorted(arrays) != ["basis", "center", "special", "special_ids"] or _map_digest(arrays) != str(audit["map-digest"]):
        raise PolicyError("this device's kept federation map does not match the one it audited")
    split = node.device.split
    subspace = Subspace(*(torch.from_numpy(arrays[k]) for k in ("center", "basis", "special_ids", "special")),
                        reader_accuracy=float("nan"))
    subspace.check(split.hidden_size)
    defense = device_defense("label-subspace", split, epsilon=cfg.epsilon, texts=[], labels=[], max_length=cfg.max_length,
                             release=cfg.release, key=key, subspace=subspace, subspace_rank=cfg.subspace_rank)
    node.defense = node.device.defense = defense
    node.map_digest = str(audit["map-digest"])


@app.query("fit")
def query_fit(msg: Message, context: Context) -> Message:
    """The federation's label map, step 1: this device's clipped token statistics, with Gaussian
    noise from its own floor (fit-epsilon, fit-delta); only they and public numbers go back."""
    from flwr.app import MetricRecord

    from .federated_map import device_contribution

    if len(msg.content.keys()):
        raise SchemaError(f"the fit query carries records {sorted(msg.content.keys())}; it carries none")
    cfg, policy, node, (rows, ids, labels), pid = _map_prepare(msg, context)
    phase = _fit_phase(context)
    key, ledger = _fit_ledger(context, policy, cfg, pid)
    try:  # fresh noise on a second answer (in this run or a later one) would average away
        ledger.admit("federated-map-fit", [key.example_id(t.tolist()) for t in ids], fresh=True)
    except ReleaseBudgetExceeded:
        raise PolicyError("this device refuses the fit query: its sentences have already entered a fit phase of a "
                          "federation label map (in this run or an earlier one, by its fit ledger); each enters one, "
                          "ever, since fresh noise on a second answer could be averaged with the first") from None
    if ledger.path is None:
        context.state.config_records[FIT_LEDGER] = ConfigRecord({"ledger": ledger.to_bytes()})
    phase["statistics-sent"] = True  # this run's fit phase: its reader steps may follow
    stats, metrics = device_contribution(rows, ids, labels, cfg=cfg, policy=policy, special_ids=node.device.split.special_ids)
    arrays = ArrayRecord({k: Array(v) for k, v in stats.to_numpy().items()})
    return Message(content=RecordDict({"statistics": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


FIT_PHASE = "federated-map-phase"  # context.state ConfigRecord: what this device has spent of its fit budget
FIT_LEDGER = "federated-map-fit-ledger"  # context.state ConfigRecord: the in-memory fit ledger (a simulated device)
_FIT_LEDGERS: dict[str, ReleaseLedger] = {}  # a file key's fit ledger, beside it


def _fit_ledger(context: Context, policy: DevicePolicy, cfg: RunConfig, pid: int) -> tuple[NoiseKey, ReleaseLedger]:
    """This device's key and its fit ledger: which of its sentences have entered a fit phase (a
    budget of one, ever). Kept where its release ledger is: beside a file key for the device's
    lifetime, else in ``context.state`` for the run's."""
    key, releases = device_key(context, policy, cfg, pid)
    if releases.path is None:
        kept = context.state.config_records.get(FIT_LEDGER)
        return key, ReleaseLedger(1, data=None if kept is None else bytes(kept["ledger"]))
    path = releases.path.with_name(releases.path.name.replace(".ledger.json", "") + ".fit-ledger.json")
    if str(path) not in _FIT_LEDGERS:
        _FIT_LEDGERS[str(path)] = ReleaseLedger(1, path)
    return key, _FIT_LEDGERS[str(path)]


def _fit_phase(context: Context) -> ConfigRecord:
    if FIT_PHASE not in context.state.config_records:
        context.state.config_records[FIT_PHASE] = ConfigRecord({"statistics-sent": False, "reader-steps": 0})
    return context.state.config_records[FIT_PHASE]


@app.query("reader")
def query_reader(msg: Message, context: Context) -> Message:
    """The federation's label map, the reader rounds: the weights arrive; this device takes its
    private full-batch steps on its own sentences (privtune_flwr.federated_reader) and returns the
    change. It takes at most the run's rounds x steps, noise calibrated to its own floor for them."""
    from flwr.app import MetricRecord

    from .federated_reader import ReaderPlan, check_weights, private_steps, reader_shapes, split_budget

    expected = {"config": "configs", "frame": "arrays", "weights": "arrays"}
    kinds = {k: ("arrays" if k in msg.content.array_records else "configs" if k in msg.content.config_records else "other")
             for k in msg.content.keys()}
    if kinds != expected:
        raise SchemaError(f"the reader message carries records {kinds}; accepted: exactly {expected}")
    cfg, policy, node, (rows, ids, labels), _ = _map_prepare(msg, context)
    split = node.device.split
    plan = ReaderPlan.from_config(cfg)
    phase = _fit_phase(context)
    if not phase["statistics-sent"]:  # reader steps belong to this run's fit phase, which the fit ledger admitted
        raise PolicyError("this device takes reader steps only in a run whose fit query it answered (query.fit)")
    committed = int(phase.get("reader-plan", plan.total_steps))  # the plan of its first step binds the device
    spent = int(phase["reader-steps"])
    if spent + plan.steps > committed or plan.total_steps != committed:
        raise PolicyError(f"this device has taken {spent} of the {committed} reader steps its fit budget covers; "
                          f"{plan.steps} more would exceed them")
    if math.isinf(policy.fit_epsilon):
        multiplier = 0.0
    else:
        _, multiplier = split_budget(policy.fit_epsilon, policy.fit_delta, plan)
    weights = check_weights({k: v for k, v in msg.content.array_records["weights"].items()},
                            reader_shapes(plan, split.hidden_size))
    frame = check_weights({k: v for k, v in msg.content.array_records["frame"].items()},
                          {"center": (split.hidden_size,)}, "reader frame")
    scale = msg.content.config_records["config"].get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise SchemaError(f"the reader message's scale={scale!r} is outside the accepted range (0, inf)")
    phase["reader-plan"] = committed
    phase["reader-steps"] = spent + plan.steps  # booked before the noise is drawn: a step is spent once
    change, metrics = private_steps(weights, rows, ids, labels, center=frame["center"], scale=float(scale),
                                    special_ids=split.special_ids, plan=plan, multiplier=multiplier)
    return Message(content=RecordDict({"change": ArrayRecord({k: Array(v.numpy()) for k, v in change.items()}),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("map")
def query_map(msg: Message, context: Context) -> Message:
    """The federation's label map, step 2: the sum of the devices' statistics arrives; this device
    checks it, derives the map itself, audits it on its own data (an inverter trained through it,
    the label read back) and keeps it, or refuses it with an error that names its floor."""
    from flwr.app import MetricRecord

    from .federated_map import AGGREGATE, AUDIT, MapStatistics, audit_map, check_audit, released_coordinates

    from .federated_reader import WEIGHTS, check_weights

    names = sorted(msg.content.keys())
    if names not in (["statistics"], ["statistics", "weights"]) or any(n not in msg.content.array_records for n in names):
        raise SchemaError(f"the map message carries records {names}; accepted: the ArrayRecord 'statistics' and, "
                          "after reader rounds, the ArrayRecord 'weights'")
    cfg, policy, node, (rows, ids, labels), pid = _map_prepare(msg, context)
    split = node.device.split
    record = msg.content.array_records["statistics"]
    stats = MapStatistics.from_arrays({k: v for k, v in record.items()}, classes=cfg.num_labels, hidden=split.hidden_size,
                                      specials=len(split.special_ids))
    weights = None
    if "weights" in names:
        weights = check_weights({k: v for k, v in msg.content.array_records["weights"].items()},
                                {WEIGHTS: (split.hidden_size, cfg.subspace_rank)}, "map weights")[WEIGHTS]
    key, _ = device_key(context, policy, cfg, pid)
    defense = _derive(cfg, node, stats, key, weights)
    # the audit's split and inverter start come from this device's entropy: a map the cloud crafted
    # against a known audit (a public seed) would not meet the same inverter here
    audit = audit_map(released_coordinates(defense, rows, ids), ids, labels, special_ids=split.special_ids,
                      seed=secrets.randbits(63))
    log.info("device %d: federation map audit: inversion %.3f (floor %.3f), label %s", pid, audit.inversion,
             policy.max_map_inversion, "n/a" if audit.label is None else f"{audit.label:.3f}")
    check_audit(audit, max_inversion=policy.max_map_inversion, min_label=policy.min_map_label_accuracy)
    kept = _map_arrays(defense)
    context.state.array_records[AGGREGATE] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    context.state.config_records[AUDIT] = ConfigRecord({"digest": stats.digest(), "map-digest": _map_digest(kept),
                                                        **audit.metrics()})
    node.defense = node.device.defense = defense
    node.map_digest = _map_digest(kept)
    _ROWS.pop((cfg, pid, int(context.node_config["num-partitions"])), None)  # the fit and the audit are done
    return Message(content=RecordDict({"metrics": MetricRecord({**audit.metrics(), "map-accepted": 1.0})}), reply_to=msg)
