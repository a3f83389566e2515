"""The cloud side of the u-shaped protocol: the middle's LoRA weights, and nothing of the labels.

Each round runs ``train.batches-per-round`` steps. One step, for the sampled devices together:

1. ``train.forward``: each device releases one batch (representations and mask, no labels);
2. the cloud runs the middle on each release and sends each device its outputs (``train.head``);
3. each device computes its loss on its own labels, updates its own head, and returns the gradient
   with respect to those outputs; the cloud back-propagates every gradient that matches what it
   sent. With ``train.middle-steps = "per-batch"`` (default) it then takes one optimiser step per device
   batch, in partition order, as the vanilla top does (each gradient was computed at the weights
   the exchange started from); with ``"joint"`` one step for the exchange, weighted by batch size.
   A gradient of the wrong shape, a stale step, an error or no answer: that device's part of the
   step is dropped with its graph.

Evaluation: ``evaluate.forward`` / ``evaluate.head``; the devices score their test splits with
their own heads and send back aggregate metrics. Generation tasks also run a few samples before
and after fine-tuning (``evaluate.prompt``/``next``/``finish``): the cloud computes the middle for
each next token, the device picks it and keeps the text; only a ROUGE-L score comes back.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from privtune_flwr.cloud import MiddleSide
from privtune_flwr.config import RunConfig
from privtune_flwr.schema import Plan, SchemaError, parse_gradient, parse_head_metrics, parse_release, step_instruction

from .reporting import DEVICE_ERROR, send_bounded
from .split_learning import TRAIN_AVERAGED, SplitLearningStrategy, _fmt, reply_bytes

log = logging.getLogger("privtune_flwr.cloud")


def _nbytes(*tensors: torch.Tensor) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


class UShapedStrategy(SplitLearningStrategy):
    """Owns the middle (LoRA) and its optimiser; the devices own their heads, labels and losses."""

    def __init__(self, middle: MiddleSide, cfg: RunConfig, *, output_dir=None):
        super().__init__(middle, cfg, output_dir=output_dir)
        self.generation: dict[str, dict] = {}

    def plan(self, phase: str) -> Plan:
        c = self.cfg
        examples = c.batch_size if phase == "train" else self.evaluation_examples()
        return Plan(hidden_size=self.cloud.split.hidden_size, num_labels=0, max_examples=examples, max_tokens=c.max_length,
                    transport=c.transport_dtype)

    def cloud_state(self) -> dict:
        return self.cloud.state()

    def load_cloud_state(self, state: dict) -> None:
        self.cloud.split.load_trainable_state(state["trainable"])
        if state.get("optimizer") and self.cloud.optimizer is not None:
            self.cloud.optimizer.load_state_dict(state["optimizer"])
        self.cloud.steps = int(state["steps"])

    def _ask(self, grid: Grid, nodes, kind: str, server_round: int, step: int, outputs=None, *,
             plan: Plan | None = None) -> list[Message]:
        outputs = outputs or {}
        messages = [Message(content=step_instruction(server_round, step, outputs.get(n)), message_type=kind, dst_node_id=n)
                    for n in nodes]
        self._traffic["down"] += sum(_nbytes(o) for o in outputs.values())
        self._traffic["messages"] += len(messages)
        plan = plan or self.plan("train" if kind.startswith("train") else "evaluate")
        replies = send_bounded(grid, messages, timeout=self._timeout_for(nodes), max_reply_bytes=reply_bytes(plan))
        self._traffic["messages"] += len(replies)
        return replies

    def _reject(self, server_round: int, phase: str, node: int, reason: str) -> None:
        self.rejected.add(server_round, phase, self.device_name(node), reason)

    def _middle(self, server_round, step, releases, *, train: bool) -> dict[int, tuple[str, torch.Tensor]]:
        outputs = {}
        for node, rel in releases:
            key = f"{server_round}/{step}/{node}"
            outputs[node] = (key, self.cloud.forward(key, rel.hidden, rel.attention_mask, train=train))
            self._traffic["up"] += _nbytes(rel.hidden, rel.attention_mask.to(torch.int8))
        return outputs

    # -- train --------------------------------------------------------------------------------------
    def train_round(self, grid: Grid, server_round: int, sample: list[int]) -> bool:
        self._traffic = {"up": 0, "down": 0, "messages": 0}
        t0 = time.perf_counter()
        losses, examples, usable, steps, all_releases = [], 0, set(), 0, []
        for step in range(self.cfg.batches_per_round):
            releases = self._valid_releases(server_round, "train", self._ask(grid, sample, "train.forward", server_round, step),
                                            report=False)
            all_releases += releases
            if not releases:
                continue
            outputs = self._middle(server_round, step, releases, train=True)
            replies = self._ask(grid, list(outputs), "train.head", server_round, step, {n: o for n, (_, o) in outputs.items()})
            answered, separate = 0, []
            for reply in replies:
                node = reply.metadata.src_node_id
                if node not in outputs:
                    continue
                key, out = outputs[node]
                if reply.has_error():
                    self._reject(server_round, "train", node, DEVICE_ERROR + str(reply.error.reason))
                    continue
                try:
                    grad, metrics = parse_gradient(reply.content, tuple(out.shape))
                    clip = self.cfg.max_grad_norm or None  # one device's share of a step is bounded
                    if self.cfg.middle_steps == "per-batch":
                        order = (self.partition.get(node, 1 << 62), node)
                        separate.append((order, out.shape[0], self.cloud.gradients(key, grad, max_norm=clip)))
                    else:
                        self.cloud.backward(key, grad, weight=float(out.shape[0]), max_norm=clip)
                except (SchemaError, KeyError, ValueError) as exc:
                    self._reject(server_round, "train", node, str(exc))
                    continue
                self._traffic["up"] += _nbytes(grad)
                answered += out.shape[0]
                losses.append((metrics["loss"], out.shape[0]))
                usable.add(node)
            for key, _ in outputs.values():  # whatever did not come back: its graph goes now
                self.cloud.drop(key)
            if separate:  # one optimiser step per device batch, in partition order, as the vanilla top
                for _, n, grads in sorted(separate, key=lambda item: item[0]):
                    if self.cloud.apply(grads):
                        steps += 1
                        examples += n
            elif answered and self.cloud.step(scale=1.0 / answered):
                examples += answered
                steps += 1
        self.rejected.report_phase(server_round, "train")
        self._round.update({"round": server_round, "replies": len(sample) * self.cfg.batches_per_round,
                            "valid-replies": len(usable), "devices-lost": self.devices_lost})
        if len(usable) < self.cfg.min_replies or not steps:
            log.warning("round %d: %d devices completed a step < federation.min-replies=%d", server_round, len(usable), self.cfg.min_replies)
            return False
        total = sum(n for _, n in losses)
        metrics = {
            "train-loss": sum(v * n for v, n in losses) / total, "num-examples": float(examples), "steps": float(steps),
            "cloud-seconds": time.perf_counter() - t0, "bytes-received": float(self._traffic["up"]),
            "bytes-sent": float(self._traffic["down"]), "messages-per-step": self._traffic["messages"] / max(steps, 1),
        }
        metrics.update(self._release_metrics(all_releases, TRAIN_AVERAGED))
        self._round.update(metrics)
        return True

    # -- evaluate -----------------------------------------------------------------------------------
    def evaluate_round(self, grid: Grid, server_round: int) -> None:
        self._traffic = {"up": 0, "down": 0, "messages": 0}
        nodes = self.evaluation_sample(self._wait_for_devices(grid), server_round)
        releases = self._valid_releases(server_round, "evaluate", self._ask(grid, nodes, "evaluate.forward", server_round, 0),
                                        report=False)
        outputs = self._middle(server_round, 0, releases, train=False)
        scores = []
        for reply in self._ask(grid, list(outputs), "evaluate.head", server_round, 0, {n: o for n, (_, o) in outputs.items()}):
            node = reply.metadata.src_node_id
            if node not in outputs:
                continue
            if reply.has_error():
                self._reject(server_round, "evaluate", node, DEVICE_ERROR + str(reply.error.reason))
                continue
            try:
                scores.append(parse_head_metrics(reply.content, examples=outputs[node][1].shape[0]))
            except SchemaError as exc:
                self._reject(server_round, "evaluate", node, str(exc))
        self.rejected.report_phase(server_round, "evaluate")
        if not scores:
            log.warning("round %d: no valid evaluation replies", server_round)
            self.history.append(dict(self._round))
            return
        total = sum(s["num-examples"] for s in scores)
        metrics = {"test-num-examples": total}
        for key in ("loss", "accuracy", "macro-f1", "perplexity"):
            pairs = [(s[key], s["num-examples"]) for s in scores if key in s]
            if pairs:  # example-weighted over devices (macro-F1: the weighted mean of the devices')
                metrics[f"test-{key}"] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        metrics.update(self._release_metrics(releases, ("self-audit-knn",), prefix="test-"))
        if "test-perplexity" in metrics and "test-accuracy" not in metrics:
            metrics["test-accuracy"] = None  # generation: perplexity is the utility (see test-perplexity)
        self._round.update(metrics)
        self._round["round-seconds"] = time.perf_counter() - self._t_round
        self.history.append(dict(self._round))
        r = self._round
        quality = (f"test perplexity {r['test-perplexity']:.2f}" if self.cfg.task == "generation"
                   else f"test acc {r['test-accuracy']:.4f} | macro-F1 {r['test-macro-f1']:.4f}")
        log.info("[round %d/%d] train loss %s | %s | self-audit KNN %s | %.1f s", server_round, self.cfg.num_rounds,
                 _fmt(r.get("train-loss")), quality, _fmt(r.get("self-audit-knn")), r["round-seconds"])
        self.write_history()

    # -- generation samples -------------------------------------------------------------------------
    def before_rounds(self, grid: Grid) -> None:
        if self.cfg.task == "generation" and self.cfg.generate_samples and not self.restored_round:
            self.generation["before"] = self.generate(grid, 1, "before fine-tuning")

    def after_rounds(self, grid: Grid) -> None:
        if self.cfg.task == "generation" and self.cfg.generate_samples:
            self.generation["after"] = self.generate(grid, self.cfg.num_rounds, "after fine-tuning")

    def generate(self, grid: Grid, server_round: int, label: str) -> dict:
        """Greedy generation on the first device: the cloud runs the middle for every new token,
        the device chooses it from its head and keeps the text. Returns the device's ROUGE-L."""
        self._traffic = {"up": 0, "down": 0, "messages": 0}
        node = self._wait_for_devices(grid)[0]
        count, d = self.cfg.generate_samples, self.cloud.split.hidden_size
        prompt_plan = Plan(d, 0, count, self.cfg.max_length, transport=self.cfg.transport_dtype)
        prompt = self._valid_releases(server_round, "generate",
                                      self._ask(grid, [node], "evaluate.prompt", server_round, 0, plan=prompt_plan), plan=prompt_plan)
        if not prompt:
            return {"error": "the device released no prompt"}
        hidden, mask = prompt[0][1].hidden, prompt[0][1].attention_mask
        step_plan = Plan(d, 0, hidden.shape[0], 1, transport=self.cfg.transport_dtype)
        for step in range(1, self.cfg.max_new_tokens + 1):
            last = self.cloud.forward("generate", hidden, mask, train=False)[:, -1:].contiguous()
            got = self._valid_releases(server_round, "generate",
                                       self._ask(grid, [node], "evaluate.next", server_round, step, {node: last}, plan=step_plan),
                                       plan=step_plan)
            if not got:
                return {"error": f"the device stopped answering at token {step}"}
            hidden = torch.cat([hidden, got[0][1].hidden], 1)
            mask = torch.cat([mask, got[0][1].attention_mask], 1)
        replies = self._ask(grid, [node], "evaluate.finish", server_round, 0, plan=step_plan)
        try:
            if replies[0].has_error():
                raise SchemaError(DEVICE_ERROR + str(replies[0].error.reason))
            scores = parse_head_metrics(replies[0].content, examples=hidden.shape[0])
        except SchemaError as exc:
            self._reject(server_round, "generate", node, str(exc))
            return {"error": str(exc)}
        log.info("generation %s: ROUGE-L %.3f on %s's first %d test examples (the texts stay on the device; "
                 "see its log)", label, scores["rouge-l"], self.device_name(node), int(scores["num-examples"]))
        return {"rouge-l": scores["rouge-l"], "device": self.device_name(node), "examples": scores["num-examples"],
                "messages": self._traffic["messages"]}
