"""The cloud: a Flower strategy that fine-tunes the top model on what devices release.

Unlike FedAvg there is nothing to average. Each round (``Strategy.start`` drives it):

1. ``configure_train``: wait for the devices (asking each new one once which data partition it
   holds), sample some, ask each for its round's batches;
2. ``aggregate_train``: validate every reply against the schema (rejecting and logging bad
   ones), train the top's LoRA weights on each valid release, checkpoint, report metrics;
3. ``configure_evaluate``: ask every connected device to release its test split;
4. ``aggregate_evaluate``: score the top on those releases (accuracy, macro-F1, loss).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privtune_flwr.config import RunConfig
from privtune_flwr.schema import Release, SchemaError, instruction, parse_release, read_device_identity
from privtune_flwr.training import CloudSide, classification_metrics

from .reporting import DEVICE_ERROR, RejectedReplies

log = logging.getLogger("privtune_flwr.cloud")


class SplitLearningStrategy(Strategy):
    """Cloud side of vanilla split learning; owns the top model, LoRA and optimiser."""

    def __init__(self, cloud: CloudSide, cfg: RunConfig, *, output_dir: Path | None = None):
        self.cloud = cloud
        self.cfg = cfg
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.rng = random.Random(cfg.seed)
        self.history: list[dict] = []
        self.rejected = RejectedReplies(self.output_dir)
        self.partition: dict[int, int] = {}  # node id -> the data partition the device says it holds
        self._asked: set[int] = set()
        self._round: dict = {}
        self._t_round = time.perf_counter()

    # -- helpers -----------------------------------------------------------------
    def _wait_for_devices(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.cfg.timeout
        said, said_at = -1, 0.0
        while len(nodes := sorted(grid.get_node_ids())) < self.cfg.min_devices:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of min-devices={self.cfg.min_devices} devices connected within {self.cfg.timeout:.0f} s")
            if len(nodes) != said or time.monotonic() - said_at > 30:  # on change, else every 30 s
                log.info("waiting for devices: %d of min-devices=%d connected%s", len(nodes), self.cfg.min_devices,
                         "" if said >= 0 else ' (start more SuperNodes; in a simulation: --federation-config "num-supernodes=N")')
                said, said_at = len(nodes), time.monotonic()
            time.sleep(1.0)
        self._identify(grid, nodes)
        return sorted(nodes, key=self._order)

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask devices not seen before which partition they hold (a node id is random per run)."""
        new = [n for n in nodes if n not in self.partition and n not in self._asked]
        if not new:
            return
        self._asked.update(new)  # one question per device: one that cannot answer is not asked again
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in new]
        for reply in grid.send_and_receive(queries, timeout=self.cfg.timeout):
            if not reply.has_error():
                try:
                    self.partition[reply.metadata.src_node_id] = read_device_identity(reply.content)
                except SchemaError as exc:
                    log.warning("device %d answered the identity query wrongly: %s", reply.metadata.src_node_id, exc)

    def _order(self, node: int) -> tuple[int, int]:
        """Devices in partition order; any that did not say theirs come after, by node id."""
        return (self.partition.get(node, 1 << 62), node)

    def device_name(self, node: int) -> str:
        pid = self.partition.get(node)
        return f"device {pid}" if pid is not None else f"node {node} (partition unknown)"

    def _messages(self, node_ids: Iterable[int], server_round: int, num_batches: int, kind: str) -> list[Message]:
        return [Message(content=instruction(server_round, num_batches), message_type=kind, dst_node_id=n) for n in node_ids]

    def _valid_releases(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[tuple[int, Release]]:
        valid = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = DEVICE_ERROR + str(reply.error.reason)
            else:
                try:
                    valid.append((node, parse_release(reply.content, hidden_size=self.cloud.split.hidden_size, num_labels=self.cloud.split.num_labels)))
                    continue
                except SchemaError as exc:
                    reason = str(exc)
            self.rejected.add(server_round, phase, self.device_name(node), reason)
        self.rejected.report_phase(server_round, phase)
        # Replies arrive in whatever order the devices finish; training in partition order keeps
        # a seeded run reproducible.
        return sorted(valid, key=lambda pair: self._order(pair[0]))

    @staticmethod
    def _weighted(releases: list[tuple[int, Release]], key: str) -> float | None:
        pairs = [(r.metrics[key], r.num_examples) for _, r in releases if key in r.metrics]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    # -- Strategy API ------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = self._wait_for_devices(grid)
        sample = sorted(self.rng.sample(nodes, min(self.cfg.devices_per_round, len(nodes))), key=self._order)
        log.info("round %d: sampled %d of %d devices", server_round, len(sample), len(nodes))
        self._t_round = time.perf_counter()
        return self._messages(sample, server_round, self.cfg.batches_per_round, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._valid_releases(server_round, "train", replies)
        self._round = {"round": server_round, "replies": len(replies), "valid-replies": len(valid)}
        if len(valid) < self.cfg.min_replies:
            log.warning("round %d: %d valid replies < min-replies=%d; the top is not updated this round", server_round, len(valid), self.cfg.min_replies)
            return None, MetricRecord({"valid-replies": len(valid)})
        losses: list[float] = []
        t0 = time.perf_counter()
        for _, rel in valid:
            losses += self.cloud.train_on(rel.hidden, rel.attention_mask, rel.labels)
        metrics = {
            "train-loss": sum(losses) / len(losses),
            "num-examples": float(sum(r.num_examples for _, r in valid)),
            "steps": float(len(losses)),
            "valid-replies": float(len(valid)),
            "cloud-seconds": time.perf_counter() - t0,
            # counted from what arrived, not from what the devices say they sent
            "bytes-received": float(sum(r.hidden.numel() * 4 + r.attention_mask.numel() + r.labels.numel() * 8 for _, r in valid)),
        }
        for key in ("self-audit-knn", "bottom-seconds", "defense-seconds", "epsilon-effective-median"):
            value = self._weighted(valid, key)
            if value is not None:
                metrics[key] = value
        for key in ("epsilon-per-sequence-max", "slack-per-sequence-max", "releases-per-example-max", "epsilon-effective-max",
                    "slack-max", "epsilon-effective-min"):
            values = [r.metrics[key] for _, r in valid if key in r.metrics]
            if values:  # extremes over devices, not averages (the median stays example-weighted)
                metrics[key] = min(values) if key.endswith("-min") else max(values)
        self._round.update(metrics)
        if self.output_dir is not None:
            self.cloud.save(self.output_dir / "checkpoints" / f"round-{server_round:03d}.pt")
        state = {k: v.contiguous() for k, v in self.cloud.split.trainable_state().items()}
        return ArrayRecord(state), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(self._wait_for_devices(grid), server_round, 0, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._valid_releases(server_round, "evaluate", list(replies))
        if not valid:
            log.warning("round %d: no valid evaluation replies", server_round)
            self.history.append(dict(self._round))  # what the round did train stays on record
            return None
        self.cloud.split.top.eval()
        with torch.no_grad():
            logits = torch.cat([self.cloud.split.top(r.hidden, r.attention_mask) for _, r in valid])
        labels = torch.cat([r.labels for _, r in valid])
        scores = classification_metrics(logits, labels, self.cloud.split.num_labels)
        metrics = {f"test-{k}": v for k, v in scores.items()}
        audit = self._weighted(valid, "self-audit-knn")
        if audit is not None:
            metrics["test-self-audit-knn"] = audit
        for key in ("releases-per-example-max", "epsilon-per-sequence-max"):
            values = [r.metrics[key] for _, r in valid if key in r.metrics]
            if values:
                metrics[f"test-{key}"] = max(values)
        self._round.update(metrics)
        self._round["round-seconds"] = time.perf_counter() - self._t_round
        self.history.append(dict(self._round))
        r = self._round
        log.info(
            "[round %d/%d] train loss %s | test acc %.4f | macro-F1 %.4f | self-audit KNN %s | %.1f s",
            server_round, self.cfg.num_rounds, _fmt(r.get("train-loss")), r["test-accuracy"], r["test-macro-f1"],
            _fmt(r.get("self-audit-knn")), r["round-seconds"],
        )
        if self.output_dir is not None:
            (self.output_dir / "history.json").write_text(json.dumps(self.history, indent=2))
        return MetricRecord(metrics)

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "SplitLearningStrategy: model=%s split=%d %s | %d rounds x %d devices x %d batches of %d",
            c.model, c.split_layer, c.defense_summary(), c.num_rounds, c.devices_per_round, c.batches_per_round, c.batch_size,
        )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
