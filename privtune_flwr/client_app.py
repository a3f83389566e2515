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

import logging
import random
import sys
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from . import data
from .config import RunConfig
from .defenses import Defense
from .device import DeviceSide, device_defense
from .device_policy import DevicePolicy
from .mechanism.noise_key import NoiseKey, ReleaseLedger
from .models import SplitModel, load_split
from .schema import read_instruction, release_content

log = logging.getLogger(__name__)

app = ClientApp()

STATE = "device-state"  # context.state ConfigRecord: {"cursor", "epoch", "evaluations"}
SECRET = "device-secret"  # context.state ConfigRecord {"key": bytes}: a simulated device's noise key

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
    # The key is set per message (device_key); the placeholder here is never used to release.
    defense = device_defense(cfg.defense, split, epsilon=cfg.epsilon, texts=train["text"], labels=train["label"],
                             task=cfg.task, max_length=cfg.max_length, release=cfg.release, **cfg.defense_options())
    anchors = getattr(defense, "anchors", None)
    if anchors is None and cfg.audit_tokens:
        from .mechanism.anchors import get_tables

        anchors = get_tables(split, k=cfg.k, n_hops=cfg.n_hops, max_neighbours=cfg.max_neighbours).anchors
    node = Node(train, test, DeviceSide(split, defense, max_length=cfg.max_length, audit_tokens=cfg.audit_tokens, anchors=anchors), defense)
    _NODES[key] = node
    return node


def simulated() -> bool:
    """True inside a Flower simulation (the ClientApp runs in a Ray actor)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


_FILE_KEYS: dict[str, tuple[NoiseKey, ReleaseLedger]] = {}


def device_key(context: Context, policy: DevicePolicy, cfg: RunConfig, pid: int) -> tuple[NoiseKey, ReleaseLedger | None]:
    """This device's noise key (and, for a key kept in a file, its ledger of configurations).

    Never derived from anything the cloud supplies, except with ``reproducible-noise``, which the
    device's own policy must allow (checked before this is called)."""
    if cfg.reproducible_noise:
        return NoiseKey.from_seed(f"{cfg.seed}/{pid}"), None
    in_memory = policy.key_store == "memory" or (policy.key_store == "auto" and simulated() and not policy.key_file)
    if in_memory:
        record = context.state.config_records.get(SECRET)
        if record is None:
            record = context.state.config_records[SECRET] = ConfigRecord({"key": NoiseKey.fresh().to_state()})
        return NoiseKey.from_state(bytes(record["key"])), None
    path = policy.key_path(pid)
    if str(path) not in _FILE_KEYS:
        _FILE_KEYS[str(path)] = (NoiseKey.load_or_create(path), ReleaseLedger(path.with_name(path.name + ".ledger.json")))
    return _FILE_KEYS[str(path)]


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        context.state.config_records[STATE] = ConfigRecord({"evaluations": 0})
    return context.state.config_records[STATE]


def round_indices(size: int, server_round: int, count: int, seed: int) -> list[int]:
    """The ``count`` examples a device releases in round ``server_round``: positions
    ``(round - 1) * count ...`` of an endless sequence of seeded epoch shuffles.

    A pure function of the round, so a resumed run reads what an uninterrupted one would. The
    round comes from the cloud, which may thus make a device re-read examples; with release once
    a re-read is the same tensor (nothing new), and with fresh noise the device counts it.
    """
    out: list[int] = []
    position = (server_round - 1) * count
    orders: dict[int, list[int]] = {}
    while len(out) < count:
        epoch, offset = divmod(position, size)
        if epoch not in orders:
            order = list(range(size))
            random.Random(seed * 7919 + epoch).shuffle(order)
            orders[epoch] = order
        take = orders[epoch][offset : offset + count - len(out)]
        out.extend(take)
        position += len(take)
    return out


def _count_releases(context: Context, size: int, idx: list[int]) -> int:
    """Fresh noise: how often any of ``idx`` has now been sent (the device's own tally)."""
    state = _state(context)
    counts = list(state.get("sent", [0] * size))
    for i in idx:
        counts[i] += 1
    state["sent"] = counts
    return max(counts[i] for i in idx)


def _release(msg: Message, context: Context, phase: str) -> Message:
    """One device reply: this round's training batches, or the test split, released defended."""
    cfg = RunConfig.from_flower(context.run_config)
    pid, total = partition_ids(context.node_config)
    policy = DevicePolicy.from_sources(context.node_config)
    policy.check(cfg)  # before anything is loaded or released
    server_round, num_batches = read_instruction(msg.content)
    policy.check_batches(max(1, num_batches))
    node = load_node(cfg, pid, total)
    key, ledger = device_key(context, policy, cfg, pid)
    node.defense.key = key
    if phase == "train":
        idx = round_indices(len(node.train), server_round, max(1, num_batches) * cfg.batch_size, cfg.seed * 1_000 + pid)
        rows = node.train.select(idx)
    else:
        if len(node.test) == 0:
            raise ValueError(f"partition {pid} has no test examples")
        idx = list(range(min(len(node.test), cfg.eval_examples or len(node.test))))
        rows = node.test.select(idx)
    rel = node.device.release(rows["text"], rows["label"])
    if cfg.release == "fresh" or cfg.defense == "none":  # every send is a distinct release
        if phase == "train":
            releases = _count_releases(context, len(node.train), idx)
        else:
            state = _state(context)
            releases = state["evaluations"] = int(state["evaluations"]) + 1  # the same test split each time
    else:  # release once: re-sends are the same tensor; only new configurations count
        releases = 1 if ledger is None else ledger.record(node.defense.fingerprint().hex())
    rel.metrics["releases-per-example-max"] = releases
    return Message(content=release_content(rel.hidden, rel.attention_mask, rel.labels, rel.metrics), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Release this round's batches: defended representations, mask and labels."""
    return _release(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Release this device's test split (defended, as at inference) for the cloud to score."""
    return _release(msg, context, "evaluate")
