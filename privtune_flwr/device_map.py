"""The federation's label map on the device (``defense.label-subspace.fit-scope = "federation"``).

``query.fit``: the device's clipped token statistics, with Gaussian noise from its own floor
(fit-epsilon, fit-delta), once ever per sentence (its fit ledger). ``query.reader``: private
full-batch steps of the reader on its own sentences, within the steps its fit budget covers.
``query.map``: the sum of the statistics (and the reader's weights) arrive; the device derives the
map itself, audits it on its own data and keeps it, or refuses it with an error that names its floor.
"""

from __future__ import annotations

import logging
import math
import secrets

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from .accounting import ReleaseBudgetExceeded
from .config import RunConfig
from .data import partition_ids
from .device import device_defense
from .device_policy import DevicePolicy, PolicyError
from .device_runtime import FIT_LEDGER, FIT_PHASE, RUNTIME, Node, device_key, load_node, map_arrays, map_digest
from .mechanism.noise_key import NoiseKey
from .schema import SchemaError

log = logging.getLogger(__name__)


def map_prepare(msg: Message, context: Context):
    cfg = RunConfig.from_flower(context.run_config)
    pid, total = partition_ids(context.node_config)
    policy = DevicePolicy.from_sources(context.node_config)
    policy.check(cfg)
    if not cfg.federated_map():
        raise SchemaError(f"{msg.metadata.message_type!r} belongs to defense.name='label-subspace' with "
                          f"defense.label-subspace.fit-scope='federation'; this run has defense.name={cfg.defense!r}, "
                          f"defense.label-subspace.fit-scope={cfg.subspace_fit_scope!r}")
    node = load_node(cfg, pid, total)
    from .device import _clean_rows

    # (cfg, pid, total) -> the clean training rows that the fit and the audit read
    rows = RUNTIME.resources.get("rows", (cfg, pid, total), lambda: _clean_rows(node.device.split, node.train["text"], node.train["label"],
                                                                         max_length=cfg.max_length, chunk=256))
    return cfg, policy, node, rows, pid


def derive(cfg: RunConfig, node: Node, stats, key: NoiseKey, weights=None):
    from .federated_map import derive_subspace

    split = node.device.split
    subspace = derive_subspace(stats, cfg.subspace_rank, special_ids=split.special_ids, weights=weights)
    return device_defense("label-subspace", split, epsilon=cfg.epsilon, texts=[], labels=[], max_length=cfg.max_length,
                          release=cfg.release, key=key, subspace=subspace, subspace_rank=cfg.subspace_rank)


def query_fit(msg: Message, context: Context) -> Message:
    """The federation's label map, step 1: this device's clipped token statistics, with Gaussian
    noise from its own floor (fit-epsilon, fit-delta); only they and public numbers go back."""
    from flwr.app import MetricRecord

    from .federated_map import device_contribution

    if len(msg.content.keys()):
        raise SchemaError(f"the fit query carries records {sorted(msg.content.keys())}; it carries none")
    cfg, policy, node, (rows, ids, labels), pid = map_prepare(msg, context)
    phase = fit_phase(context)
    key, ledger = RUNTIME.fit_ledger(context, policy, cfg, pid)
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


def fit_phase(context: Context) -> ConfigRecord:
    if FIT_PHASE not in context.state.config_records:
        context.state.config_records[FIT_PHASE] = ConfigRecord({"statistics-sent": False, "reader-steps": 0})
    return context.state.config_records[FIT_PHASE]


def query_reader(msg: Message, context: Context) -> Message:
    """The federation's label map, the reader rounds: the weights arrive; this device takes its
    private full-batch steps on its own sentences (privtune_flwr.federated_reader) and returns the
    change, or (``fit-optimizer = "cloud"``) one noisy gradient sum. It releases at most the run's
    :attr:`~privtune_flwr.federated_reader.ReaderPlan.total_steps` noisy sums, noise calibrated to
    its own floor for them."""
    from flwr.app import MetricRecord

    from .federated_reader import (ReaderPlan, check_weights, private_gradient, private_steps, reader_record,
                                   reader_shapes, split_budget)

    expected = {"config": "configs", "frame": "arrays", "weights": "arrays"}
    kinds = {k: ("arrays" if k in msg.content.array_records else "configs" if k in msg.content.config_records else "other")
             for k in msg.content.keys()}
    if kinds != expected:
        raise SchemaError(f"the reader message carries records {kinds}; accepted: exactly {expected}")
    cfg, policy, node, (rows, ids, labels), _ = map_prepare(msg, context)
    split = node.device.split
    plan = ReaderPlan.from_config(cfg)
    phase = fit_phase(context)
    if not phase["statistics-sent"]:  # reader steps belong to this run's fit phase, which the fit ledger admitted
        raise PolicyError("this device takes reader steps only in a run whose fit query it answered (query.fit)")
    committed = int(phase.get("reader-plan", plan.total_steps))  # the plan of its first step binds the device
    spent = int(phase["reader-steps"])
    if spent + plan.steps_per_round > committed or plan.total_steps != committed:
        raise PolicyError(f"this device has taken {spent} of the {committed} reader steps its fit budget covers; "
                          f"{plan.steps_per_round} more would exceed them")
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
    phase["reader-steps"] = spent + plan.steps_per_round  # booked before the noise is drawn: a step is spent once
    release = private_steps if plan.optimizer == "device" else private_gradient
    out, metrics = release(weights, rows, ids, labels, center=frame["center"], scale=float(scale),
                           special_ids=split.special_ids, plan=plan, multiplier=multiplier)
    return Message(content=RecordDict({reader_record(plan): ArrayRecord({k: Array(v.numpy()) for k, v in out.items()}),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg)


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
    cfg, policy, node, (rows, ids, labels), pid = map_prepare(msg, context)
    split = node.device.split
    record = msg.content.array_records["statistics"]
    stats = MapStatistics.from_arrays({k: v for k, v in record.items()}, classes=cfg.num_labels, hidden=split.hidden_size,
                                      specials=len(split.special_ids))
    weights = None
    if "weights" in names:
        weights = check_weights({k: v for k, v in msg.content.array_records["weights"].items()},
                                {WEIGHTS: (split.hidden_size, cfg.subspace_rank)}, "map weights")[WEIGHTS]
    key, _ = device_key(context, policy, cfg, pid)
    defense = derive(cfg, node, stats, key, weights)
    # the audit's split and inverter start come from this device's entropy: a map the cloud crafted
    # against a known audit (a public seed) would not meet the same inverter here
    audit = audit_map(released_coordinates(defense, rows, ids), ids, labels, special_ids=split.special_ids,
                      seed=secrets.randbits(63))
    log.info("device %d: federation map audit: inversion %.3f (floor %.3f), label %s", pid, audit.inversion,
             policy.max_map_inversion, "n/a" if audit.label is None else f"{audit.label:.3f}")
    check_audit(audit, max_inversion=policy.max_map_inversion, min_label=policy.min_map_label_accuracy)
    kept = map_arrays(defense)
    context.state.array_records[AGGREGATE] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    context.state.config_records[AUDIT] = ConfigRecord({"digest": stats.digest(), "map-digest": map_digest(kept),
                                                        **audit.metrics()})
    node.defense = node.device.defense = defense
    node.map_digest = map_digest(kept)
    RUNTIME.resources.pop("rows", (cfg, pid, int(context.node_config["num-partitions"])))  # the fit and the audit are done
    return Message(content=RecordDict({"metrics": MetricRecord({**audit.metrics(), "map-accepted": 1.0})}), reply_to=msg)
