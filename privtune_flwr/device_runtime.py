"""The device's runtime: what every protocol's handlers share.

One :class:`DeviceRuntime` per process (``RUNTIME``) owns what the process holds for the devices
it serves: rebuildable resources (the frozen bottom, each device's view, a device's clean rows
during the federation map's fit) on the bounded shelves of :mod:`privtune_flwr.resources`, and
each file-kept noise key with its ledgers, which are state and never evicted. Per device, its
reading position, its in-memory key and ledgers and its label map live in ``context.state``.

:func:`prepare` makes the device's checks before any handler loads or releases anything: the
run config against the device's own floor, the instruction's shape and size, and its key (never
derived from the message). :func:`admit` books a release against the per-example budget.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from . import data
from .accounting import ReleaseBudgetExceeded, ReleaseLedger
from .config import RunConfig
from .data import partition_ids
from .defenses import Defense
from .device import DeviceHead, DeviceSide, device_defense
from .device_policy import DevicePolicy, PolicyError
from .mechanism.noise_key import NoiseKey
from .models import SplitModel, load_split
from .resources import RESOURCES, ResourceCache
from .schema import CONFIG, read_instruction

STATE = "device-state"  # context.state ConfigRecord: {"evaluations", "sent"}
SECRET = "device-secret"  # context.state ConfigRecord {"key": bytes}: a simulated device's noise key
LEDGER = "device-ledger"  # context.state ConfigRecord {"ledger": bytes}: its release ledger (the run's lifetime)
FITTED = "device-fit"  # context.state ArrayRecord: this device's own label map (device scope), kept across actors
FITTED_ABOUT = "device-fit-inputs"  # context.state ConfigRecord: what it was fitted on (one key space per RecordDict)
FIT_PHASE = "federated-map-phase"  # context.state ConfigRecord: what this device has spent of its fit budget
FIT_LEDGER = "federated-map-fit-ledger"  # context.state ConfigRecord: the in-memory fit ledger (a simulated device)


@dataclass
class Node:
    """One device's view: its partitions and its defended bottom."""

    train: object  # datasets.Dataset
    test: object
    device: DeviceSide
    defense: Defense
    head: DeviceHead | None = None  # u-shaped: the head's module, shared by the devices a process serves
    map_digest: str = ""  # federation scope: the digest of the kept map its defence holds


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


class DeviceRuntime:
    """What one process holds for the devices it serves.

    ``resources``: the bounded shelves of rebuildable things ("split": a frozen bottom per model
    configuration; "node": a device's view, and a Ray actor may serve thousands of simulated
    devices, each evicted one set up again from the dataset, partitioner, bottom and anchor
    shelves; "rows": a device's clean rows between the federation map's statistics and its
    audit). ``file_keys`` and ``fit_ledgers``: each file-kept key with its ledgers (state)."""

    def __init__(self, resources: ResourceCache = RESOURCES):
        self.resources = resources
        self.file_keys: dict[str, tuple[NoiseKey, ReleaseLedger]] = {}
        self.fit_ledgers: dict[str, ReleaseLedger] = {}

    def split(self, cfg: RunConfig, num_labels: int) -> SplitModel:
        """The frozen bottom for ``cfg``, one per model configuration and process."""
        key = (cfg.model, cfg.split_layer, cfg.task, num_labels, cfg.protocol, cfg.lora_rank, cfg.lora_targets, cfg.seed)

        def build() -> SplitModel:
            if cfg.protocol == "vanilla":  # the device never trains: its copy carries no LoRA
                return load_split(cfg.model, cfg.split_layer, cfg.task, num_labels, lora_rank=0, seed=cfg.seed, **cfg.device_placement())
            # the device trains its head (a LoRA on a tied lm_head); it holds no middle
            return load_split(cfg.model, cfg.split_layer, cfg.task, num_labels, lora_rank=cfg.lora_rank, seed=cfg.seed,
                              protocol="u-shaped", lora_targets=cfg.lora_targets, **cfg.device_placement()).without_middle()

        return self.resources.get("split", key, build)

    def node(self, cfg: RunConfig, pid: int, total: int, state: RecordDict | None = None) -> Node:
        """This device's view for ``cfg``: from the process's cache, else built. ``state`` (the
        device's ``context.state``): where its own label map is kept across the actors that serve it."""
        key = (cfg, pid, total)
        kept = self.resources.get("node", key)
        if kept is not None:
            return kept
        train, test, num_labels = data.device_shares(cfg, pid, total)
        split = self.split(cfg, num_labels)
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
        self.resources.put("node", key, node)
        return node

    def key(self, context: Context, policy: DevicePolicy, cfg: RunConfig, pid: int) -> tuple[NoiseKey, ReleaseLedger]:
        """This device's noise key and its release ledger (the per-example release budget).

        The key is never derived from anything the cloud supplies, except with ``defense.reproducible-noise``,
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
        if str(path) not in self.file_keys:
            self.file_keys[str(path)] = (NoiseKey.load_or_create(path),
                                     ReleaseLedger(budget, path.with_name(path.name + ".ledger.json")))
        key, ledger = self.file_keys[str(path)]
        ledger.budget = budget  # the device's policy of this moment (its node config may have changed)
        return key, ledger

    def fit_ledger(self, context: Context, policy: DevicePolicy, cfg: RunConfig, pid: int) -> tuple[NoiseKey, ReleaseLedger]:
        """This device's key and its fit ledger: which of its sentences have entered a fit phase (a
        budget of one, ever). Kept where its release ledger is: beside a file key for the device's
        lifetime, else in ``context.state`` for the run's."""
        key, releases = self.key(context, policy, cfg, pid)
        if releases.path is None:
            kept = context.state.config_records.get(FIT_LEDGER)
            return key, ReleaseLedger(1, data=None if kept is None else bytes(kept["ledger"]))
        path = releases.path.with_name(releases.path.name.replace(".ledger.json", "") + ".fit-ledger.json")
        if str(path) not in self.fit_ledgers:
            self.fit_ledgers[str(path)] = ReleaseLedger(1, path)
        return key, self.fit_ledgers[str(path)]

    def clear(self) -> None:
        """Forget everything this process holds (a restarted process); key files stay on disk."""
        self.resources.clear()
        self.file_keys.clear()
        self.fit_ledgers.clear()


RUNTIME = DeviceRuntime()


def load_node(cfg: RunConfig, pid: int, total: int, state: RecordDict | None = None) -> Node:
    """This device's view for ``cfg`` (:meth:`DeviceRuntime.node` of the process's runtime)."""
    return RUNTIME.node(cfg, pid, total, state)


def device_key(context: Context, policy: DevicePolicy, cfg: RunConfig, pid: int) -> tuple[NoiseKey, ReleaseLedger]:
    """This device's noise key and release ledger (:meth:`DeviceRuntime.key`)."""
    return RUNTIME.key(context, policy, cfg, pid)


def simulated() -> bool:
    """True inside a Flower simulation (the ClientApp runs in a Ray actor)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def device_state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        context.state.config_records[STATE] = ConfigRecord({"evaluations": 0})
    return context.state.config_records[STATE]


def _count_sends(context: Context, size: int, idx: list[int]) -> int:
    """``defense.name='none'``: how often any of ``idx`` has now been sent (the device's own tally)."""
    state = device_state(context)
    counts = list(state.get("sent", [0] * size))
    for i in idx:
        counts[i] += 1
    state["sent"] = counts
    return max(counts[i] for i in idx)


def prepare(msg: Message, context: Context, *, records: tuple[str, ...] = (CONFIG,)) -> tuple[RunConfig, int, int, Node, ReleaseLedger]:
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
        use_federated_map(cfg, context, node, key)
    node.defense.key = key
    node.device.time_limit = policy.max_instruction_seconds
    return cfg, server_round, num_batches, node, ledger


def admit(cfg: RunConfig, context: Context, node: Node, ledger: ReleaseLedger, encoded: list[list[int]],
           phase: str, idx: list[int]) -> int:
    """Check the release budget for the examples ``encoded`` before any of them is computed, and
    record them; returns this device's ``releases-per-example-max`` (a per-device bound)."""
    if cfg.defense == "none":  # no noise, no budget: every send is the same clean representation
        if phase == "train":
            return _count_sends(context, len(node.train), idx)
        state = device_state(context)
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


def test_indices(cfg: RunConfig, node: Node, pid: int) -> list[int]:
    if len(node.test) == 0:
        raise ValueError(f"partition {pid} has no test examples")
    return list(range(min(len(node.test), cfg.eval_examples or len(node.test))))


def map_arrays(defense: Defense) -> dict:
    """The derived map a device keeps in its state: centre, basis and special constants (about 12 KB
    for MiniLM, against 1.2 MB for the aggregate it was derived from)."""
    arrays = {"center": defense.center, "basis": defense.basis, "special_ids": defense.special_ids,
              "special": defense.special_values}
    return {k: v.detach().cpu().contiguous().numpy() for k, v in arrays.items()}


def map_digest(arrays: dict) -> str:
    return hashlib.sha256(b"".join(arrays[k].tobytes() for k in ("center", "basis", "special_ids", "special"))).hexdigest()


def use_federated_map(cfg: RunConfig, context: Context, node: Node, key: NoiseKey) -> None:
    """Put the map this device accepted (kept in its own state) into its defence, restoring it from
    the kept map where this process has not yet (the audit is not rerun: it passed)."""
    from .federated_map import AGGREGATE, AUDIT
    from .mechanism.subspace import Subspace

    record, audit = context.state.array_records.get(AGGREGATE), context.state.config_records.get(AUDIT)
    if record is None or audit is None:
        raise PolicyError("this device holds no accepted federation label map (defense.label-subspace.fit-scope='federation'): "
                          "it releases nothing until the map's statistics arrive (query.map) and its own audit passes")
    if node.map_digest == str(audit["map-digest"]):
        return
    arrays = {k: v.numpy().copy() for k, v in record.items()}
    if sorted(arrays) != ["basis", "center", "special", "special_ids"] or map_digest(arrays) != str(audit["map-digest"]):
        raise PolicyError("this device's kept federation map does not match the one it audited")
    split = node.device.split
    subspace = Subspace(*(torch.from_numpy(arrays[k]) for k in ("center", "basis", "special_ids", "special")),
                        reader_accuracy=float("nan"))
    subspace.check(split.hidden_size)
    defense = device_defense("label-subspace", split, epsilon=cfg.epsilon, texts=[], labels=[], max_length=cfg.max_length,
                             release=cfg.release, key=key, subspace=subspace, subspace_rank=cfg.subspace_rank)
    node.defense = node.device.defense = defense
    node.map_digest = str(audit["map-digest"])
