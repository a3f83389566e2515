"""The cloud side of offsite tuning (``protocol = "offsite"``; FedBiOT / ScaleOT style).

Nothing but adapter weights travels. Each round:

1. sample ``federation.devices-per-round`` devices and send each a ``train`` message: ConfigRecord ``config``
   ``{server-round, num-batches = offsite.local-steps}`` and ArrayRecord ``adapters`` (the current
   averaged adapters, canonical names: :mod:`privtune_flwr.offsite`);
2. each device loads them into its emulator, takes ``offsite.local-steps`` steps on its own data and
   replies with ArrayRecord ``adapters`` and MetricRecord ``metrics`` ``{num-examples, train-loss,
   local-steps, train-seconds}``;
3. every reply is checked (exactly those records; exactly the adapters' keys, float32, each of its
   shape, finite; every metric in its range). A bad one is recorded in
   :class:`~strategies.reporting.RejectedReplies` and never reaches the average;
4. the valid ones are averaged with FedAvg, weighted by ``num-examples``, using Flower's own
   ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` (the replies are exactly one
   ArrayRecord and one MetricRecord each, the shape it expects, once checked here);
5. ``evaluate``: the averaged adapters go to the devices (``config`` + ``adapters``); each plugs
   them into the full model and into its emulator and scores its own test share; only aggregate
   metrics come back, averaged by examples.

The round loop, sampling, retries, lost devices, checkpoints and resume are
:class:`~strategies.split_learning.SplitLearningStrategy`'s.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from privtune_flwr import offsite
from privtune_flwr.config import RunConfig
from privtune_flwr.schema import NPY_HEADER_MAX, REPLY_RECORDS_SLACK, SchemaError

from .reporting import DEVICE_ERROR, send_bounded
from .split_learning import SplitLearningStrategy, _fmt

log = logging.getLogger("privtune_flwr.cloud")

# metric -> (low, high, integer); "num-examples" is required in both replies
TRAIN_METRICS = {"num-examples": (1, 1e9, True), "train-loss": (0.0, 1e6, False), "local-steps": (1, 4096, True),
                 "train-seconds": (0.0, 1e7, False)}
_SCORES = {"loss": (0.0, 1e6, False), "accuracy": (0.0, 1.0, False), "macro-f1": (0.0, 1.0, False),
           "perplexity": (1.0, math.inf, False)}
EVAL_METRICS = {"num-examples": (1, 1e9, True), **_SCORES, **{f"emulator-{k}": v for k, v in _SCORES.items()}}


class OffsiteCloud:
    """The cloud's part: the full model with its adapters (the averaged ones kept as tensors), and
    the emulator's report. Stands where the split strategies keep their ``CloudSide``."""

    def __init__(self, cfg: RunConfig, built: offsite.Offsite | None = None):
        self.cfg = cfg
        self.offsite = built if built is not None else offsite.from_config(cfg)
        self.adapters = self.offsite.adapter_state()
        self.spec = self.offsite.adapter_spec()
        self.steps = 0  # rounds whose average was taken
        self.split = self  # what the split strategies read as cloud.split
        self.hidden_size, self.num_labels = 0, self.offsite.num_labels
        self.emulator_report = dict(self.offsite.report)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.adapters.items()}

    def state(self) -> dict:
        return {"adapters": self.trainable_state(), "steps": self.steps}

    def plugged(self) -> torch.nn.Module:
        """The full model with the averaged adapters loaded (the cloud's deployable model)."""
        self.offsite.load_adapters(self.adapters)
        return self.offsite.full


def parse_metrics(record, ranges: dict, what: str) -> dict[str, float]:
    out = {}
    for key, value in dict(record).items():
        if key not in ranges:
            raise SchemaError(f"{what} metric {key!r} is not part of the schema; accepted: {', '.join(ranges)}")
        low, high, integer = ranges[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high or (integer and float(value) != int(value)):
            raise SchemaError(f"{what} metric {key}={value!r} is outside the accepted range [{low}, {high}]"
                              + (" (an integer)" if integer else ""))
        out[key] = float(value)
    if "num-examples" not in out:
        raise SchemaError(f"{what} metrics lack 'num-examples'")
    return out


def parse_train_reply(content: RecordDict, spec: dict[str, tuple[int, ...]], *, local_steps: int):
    """``(adapters, metrics)`` of a train reply, or a :class:`SchemaError` saying what is wrong."""
    try:
        if not isinstance(content, RecordDict) or set(content.keys()) != {offsite.ADAPTERS, offsite.METRICS} \
                or offsite.ADAPTERS not in content.array_records or offsite.METRICS not in content.metric_records:
            raise SchemaError(f"reply records {sorted(content.keys())} differ from the schema's "
                              f"ArrayRecord {offsite.ADAPTERS!r} and MetricRecord {offsite.METRICS!r}")
        record = content.array_records[offsite.ADAPTERS]
        for key, array in record.items():  # dtype and shape before any array is read
            if key in spec and (array.dtype != "float32" or tuple(array.shape) != tuple(spec[key])):
                raise SchemaError(f"adapter {key!r} has dtype {array.dtype} and shape {tuple(array.shape)}; accepted: "
                                  f"float32 and shape {tuple(spec[key])}")
        try:
            state = offsite.read_adapters(record, spec)
        except ValueError as exc:
            raise SchemaError(str(exc)) from None
        metrics = parse_metrics(content.metric_records[offsite.METRICS], TRAIN_METRICS, "train")
        if metrics.get("local-steps", local_steps) > local_steps:
            raise SchemaError(f"offsite.local-steps={metrics['local-steps']:g}; this round asked for {local_steps}")
        return state, metrics
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a malformed reply
        raise SchemaError(f"unparseable reply: {type(exc).__name__}: {exc}") from None


def fedavg(contents: list[RecordDict]) -> dict[str, torch.Tensor]:
    """The ``num-examples``-weighted mean of checked train replies (Flower's FedAvg aggregation)."""
    averaged = aggregate_arrayrecords(contents, "num-examples")
    return {k: torch.from_numpy(v.numpy().astype("float32", copy=True)) for k, v in averaged.items()}


class OffsiteStrategy(SplitLearningStrategy):
    """Samples devices, sends them the adapters, averages what comes back (FedAvg), and has the
    devices score the plugged-in full model on their own test shares."""

    def __init__(self, cloud: OffsiteCloud, cfg: RunConfig, *, output_dir=None):
        super().__init__(cloud, cfg, output_dir=output_dir)

    # the split strategies' hooks that do not apply here
    def _federation_map(self, grid, nodes) -> None:  # no representation is released: no label map
        return None

    def summary(self) -> None:
        c, r = self.cfg, self.cloud.emulator_report
        log.info("OffsiteStrategy (%s): model=%s | emulator blocks %s of %d (%.3f of the parameters; blocks %.3f) | "
                 "adapters %d weights (%d bytes each way per device) | %d rounds x %d devices x %d local steps of %d",
                 c.offsite_method, c.model, r["kept-blocks"], len(r["kept-blocks"]) + len(r["dropped-blocks"]),
                 r["parameter-ratio"], r["block-parameter-ratio"], r["adapter-parameters"], r["adapter-bytes"],
                 c.num_rounds, c.devices_per_round, c.local_steps, c.batch_size)

    def cloud_state(self) -> dict:
        return self.cloud.state()

    def load_cloud_state(self, state: dict) -> None:
        adapters = {k: v.to(torch.float32) for k, v in state["adapters"].items()}
        offsite.check_adapters(adapters, self.cloud.spec)
        self.cloud.adapters = adapters
        self.cloud.steps = int(state["steps"])

    def reply_budget(self) -> int:
        return self.cloud.offsite.adapter_bytes() + NPY_HEADER_MAX * len(self.cloud.spec) + REPLY_RECORDS_SLACK

    def _instructions(self, nodes, server_round: int, num_batches: int, kind: str) -> list[Message]:
        out = []
        for n in nodes:
            content = RecordDict({offsite.CONFIG: ConfigRecord({"server-round": int(server_round), "num-batches": int(num_batches)}),
                                  offsite.ADAPTERS: offsite.adapters_record(self.cloud.adapters)})
            out.append(Message(content=content, message_type=kind, dst_node_id=n))
        return out

    # -- train --------------------------------------------------------------------------------------
    def train_round(self, grid: Grid, server_round: int, sample: list[int]) -> bool:
        t0 = time.perf_counter()
        messages = self._instructions(sample, server_round, self.cfg.local_steps, MessageType.TRAIN)
        replies = send_bounded(grid, messages, timeout=self._timeout_for(sample), max_reply_bytes=self.reply_budget())
        valid = []
        for reply in sorted(replies, key=lambda r: self._order(r.metadata.src_node_id)):  # partition order
            node = reply.metadata.src_node_id
            if node not in sample:
                continue
            if reply.has_error():
                self.rejected.add(server_round, "train", self.device_name(node), DEVICE_ERROR + str(reply.error.reason))
                continue
            try:
                _, metrics = parse_train_reply(reply.content, self.cloud.spec, local_steps=self.cfg.local_steps)
            except SchemaError as exc:
                self.rejected.add(server_round, "train", self.device_name(node), str(exc))
                continue
            valid.append((node, reply.content, metrics))
        self.rejected.report_phase(server_round, "train")
        self._round.update({"round": server_round, "replies": len(replies), "valid-replies": len(valid),
                            "devices-lost": self.devices_lost})
        if len(valid) < self.cfg.min_replies:
            log.warning("round %d: %d valid replies < federation.min-replies=%d; the adapters are not updated this round",
                        server_round, len(valid), self.cfg.min_replies)
            return False
        averaged = fedavg([content for _, content, _ in valid])
        if not all(bool(torch.isfinite(v).all()) for v in averaged.values()):  # finite replies can still overflow
            for node, _, _ in valid:
                self.rejected.add(server_round, "train", self.device_name(node), "the average of this round's adapters overflowed")
            log.warning("round %d: the average overflowed; the adapters are not updated this round", server_round)
            return False
        self.cloud.adapters = averaged
        self.cloud.steps += 1
        weights = [m["num-examples"] for _, _, m in valid]
        per_device = self.cloud.offsite.adapter_bytes()
        self._round.update({
            "train-loss": sum(m["train-loss"] * w for (_, _, m), w in zip(valid, weights) if "train-loss" in m) / sum(weights),
            "num-examples": float(sum(weights)),
            "steps": float(sum(m.get("local-steps", self.cfg.local_steps) for _, _, m in valid)),
            "cloud-seconds": time.perf_counter() - t0,
            "bytes-sent": float(per_device * len(messages)),  # the adapters, to each sampled device
            "bytes-received": float(per_device * len(valid)),
        })
        return True

    # -- evaluate -----------------------------------------------------------------------------------
    def evaluate_round(self, grid: Grid, server_round: int) -> None:
        nodes = self.evaluation_sample(self._wait_for_devices(grid), server_round)
        messages = self._instructions(nodes, server_round, 0, MessageType.EVALUATE)
        replies = send_bounded(grid, messages, timeout=self._timeout_for(nodes), max_reply_bytes=REPLY_RECORDS_SLACK)
        budget = self.evaluation_examples()
        scores = []
        for reply in sorted(replies, key=lambda r: self._order(r.metadata.src_node_id)):
            node = reply.metadata.src_node_id
            if node not in nodes:
                continue
            if reply.has_error():
                self.rejected.add(server_round, "evaluate", self.device_name(node), DEVICE_ERROR + str(reply.error.reason))
                continue
            try:
                content = reply.content
                if set(content.keys()) != {offsite.METRICS} or offsite.METRICS not in content.metric_records:
                    raise SchemaError(f"reply records {sorted(content.keys())} differ from the schema's MetricRecord "
                                      f"{offsite.METRICS!r}")
                metrics = parse_metrics(content.metric_records[offsite.METRICS], EVAL_METRICS, "evaluate")
                if metrics["num-examples"] > budget:
                    raise SchemaError(f"num-examples={metrics['num-examples']:g} exceeds this evaluation's {budget} per device")
                scores.append(metrics)
            except SchemaError as exc:
                self.rejected.add(server_round, "evaluate", self.device_name(node), str(exc))
        self.rejected.report_phase(server_round, "evaluate")
        if not scores:
            log.warning("round %d: no valid evaluation replies", server_round)
            self.history.append(dict(self._round))
            return
        metrics = {"test-num-examples": sum(s["num-examples"] for s in scores)}
        for key in EVAL_METRICS:
            pairs = [(s[key], s["num-examples"]) for s in scores if key in s and key != "num-examples"]
            if pairs:
                name = f"emulator-test-{key[len('emulator-'):]}" if key.startswith("emulator-") else f"test-{key}"
                metrics[name] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        if self.cfg.task == "generation":
            metrics.setdefault("test-accuracy", None)  # perplexity is the utility (test-perplexity)
        metrics["test-bytes-sent"] = float(self.cloud.offsite.adapter_bytes() * len(messages))
        self._round.update(metrics)
        self._round["round-seconds"] = time.perf_counter() - self._t_round
        self.history.append(dict(self._round))
        r = self._round
        if self.cfg.task == "generation":
            quality = (f"test perplexity {r['test-perplexity']:.2f} (emulator "
                       f"{_fmt(r.get('emulator-test-perplexity'))})")
        else:
            quality = (f"test acc {r['test-accuracy']:.4f} | macro-F1 {r['test-macro-f1']:.4f} | emulator acc "
                       f"{_fmt(r.get('emulator-test-accuracy'))}")
        log.info("[round %d/%d] train loss %s | %s | %.1f s", server_round, self.cfg.num_rounds, _fmt(r.get("train-loss")),
                 quality, r["round-seconds"])
        self.write_history()
