"""The device: a Flower ClientApp that releases defended representations of its private text.

Drop-in for deployments: ``flower-supernode --node-config "partition-id=0 num-partitions=2"``
serves ``privtune_flwr.client_app:app``. In simulation Flower sets the same two keys.

Per process (a Ray actor serves many simulated devices) the frozen bottom, the defence tables
and the dataset are cached; per device, its reading position lives in ``context.state``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from . import data
from .config import RunConfig
from .defenses import Defense
from .models import SplitModel, load_split
from .schema import device_identity, read_instruction, release_content
from .training import DeviceSide, device_defense

log = logging.getLogger(__name__)

app = ClientApp()

STATE = "device-state"  # context.state ConfigRecord: {"cursor", "epoch", "evaluations"}

_SPLITS: dict[tuple, SplitModel] = {}
_NODES: dict[tuple, "Node"] = {}


@dataclass
class Node:
    """One device's view: its partitions and its defended bottom."""

    train: object  # datasets.Dataset
    test: object
    device: DeviceSide
    defense: Defense


def _split(cfg: RunConfig, num_labels: int) -> SplitModel:
    key = (cfg.model, cfg.split_layer, cfg.task, num_labels)
    if key not in _SPLITS:
        # The device never trains, so its copy carries no LoRA.
        _SPLITS[key] = load_split(cfg.model, cfg.split_layer, cfg.task, num_labels, lora_rank=0, seed=cfg.seed)
    return _SPLITS[key]


def partition_ids(node_config) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, validated."""
    try:
        pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"node config {dict(node_config)!r} needs integer 'partition-id' and 'num-partitions' "
            '(e.g. --node-config "partition-id=0 num-partitions=2")'
        ) from None
    if total < 1 or not 0 <= pid < total:
        raise ValueError(f"partition-id={pid} / num-partitions={total}: need num-partitions >= 1 and 0 <= partition-id < num-partitions")
    return pid, total


def load_node(cfg: RunConfig, pid: int, total: int) -> Node:
    key = (cfg, pid, total)
    if key in _NODES:
        return _NODES[key]
    ds = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=cfg.max_examples or None)
    split = _split(cfg, ds.num_labels)
    train = data.partition(ds.train, total, pid, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    test = data.partition(ds.test, total, pid, partitioner="iid", seed=cfg.seed)
    if len(train) == 0:
        raise ValueError(f"partition {pid} of {total} of {cfg.dataset!r} is empty; use fewer devices")
    defense = device_defense(cfg.defense, split, epsilon=cfg.epsilon, texts=train["text"], labels=train["label"],
                             task=cfg.task, max_length=cfg.max_length, seed=cfg.seed * 100_003 + pid, **cfg.defense_options())
    anchors = getattr(defense, "anchors", None)
    if anchors is None and cfg.audit_tokens:
        from .mechanism.anchors import get_tables

        anchors = get_tables(split, k=cfg.k, n_hops=cfg.n_hops, max_neighbours=cfg.max_neighbours).anchors
    node = Node(train, test, DeviceSide(split, defense, max_length=cfg.max_length, audit_tokens=cfg.audit_tokens, anchors=anchors), defense)
    _NODES[key] = node
    return node


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        context.state.config_records[STATE] = ConfigRecord({"cursor": 0, "epoch": 0, "evaluations": 0})
    return context.state.config_records[STATE]


def _next_indices(context: Context, size: int, count: int, seed: int) -> tuple[list[int], int]:
    """The next ``count`` indices of this device's shuffled epoch order (wrapping around), and
    the largest number of times any example has now been released (for composition)."""
    state = _state(context)
    cursor, epoch = int(state["cursor"]), int(state["epoch"])
    out: list[int] = []
    while len(out) < count:
        order = list(range(size))
        random.Random(seed * 7919 + epoch).shuffle(order)
        take = order[cursor : cursor + count - len(out)]
        out.extend(take)
        cursor += len(take)
        if cursor >= size:
            cursor, epoch = 0, epoch + 1
    state["cursor"], state["epoch"] = cursor, epoch
    return out, epoch + (1 if cursor else 0)


def _reseed(defense: Defense, cfg: RunConfig, pid: int, server_round: int, phase: int) -> None:
    # Fresh, reproducible noise per device, round and phase.
    defense.generator.manual_seed(hash((cfg.seed, pid, server_round, phase)) & (2**62 - 1))


def _release(msg: Message, context: Context, phase: str) -> Message:
    """One device reply: the next training batches, or the whole test split, released defended."""
    cfg = RunConfig.from_flower(context.run_config)
    server_round, num_batches = read_instruction(msg.content)
    pid, total = partition_ids(context.node_config)
    node = load_node(cfg, pid, total)
    if phase == "train":
        idx, releases = _next_indices(context, len(node.train), max(1, num_batches) * cfg.batch_size, cfg.seed * 1_000 + pid)
        rows = node.train.select(idx)
    else:
        rows = node.test
        if len(rows) == 0:
            raise ValueError(f"partition {pid} has no test examples")
        if cfg.eval_examples and len(rows) > cfg.eval_examples:
            rows = rows.select(range(cfg.eval_examples))
        state = _state(context)
        releases = state["evaluations"] = int(state["evaluations"]) + 1  # the same test split each time
    _reseed(node.defense, cfg, pid, server_round, int(phase == "evaluate"))
    hidden, mask, labels, metrics = node.device.release(rows["text"], rows["label"])
    metrics["releases-per-example-max"] = releases
    return Message(content=release_content(hidden, mask, labels, metrics), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Release this round's batches: defended representations, mask and labels."""
    return _release(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Release this device's test split (defended, as at inference) for the cloud to score."""
    return _release(msg, context, "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which data partition this device holds; the cloud orders devices by it."""
    return Message(content=device_identity(*partition_ids(context.node_config)), reply_to=msg)
