"""The two halves of one split fine-tuning step, shared by Flower and by in-process runs.

* :class:`DeviceSide`: tokenise private text, run the frozen bottom, apply the defence, and
  measure what the release would leak to a nearest-anchor decoder (the self-audit).
* :class:`CloudSide`: the top model, its LoRA optimiser, training and evaluation on releases.

The ClientApp and the strategy are thin wrappers around these, and the centralised baseline
and the privacy-utility sweep call them directly, so every path trains the same way.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .defenses import Defense, build_defense
from .models import SplitModel


def device_defense(name: str, split: SplitModel, *, epsilon: float | None, texts, labels, task: str = "classification",
                   max_length: int = 64, seed: int = 0, **options) -> Defense:
    """Build defence ``name`` as a device does: PrivTune's token importance comes from the
    device's own ``texts``/``labels``, which never leave it."""
    if name.startswith("privtune"):
        ids = [split.tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        options["importance"] = {"sequences": ids, "labels": list(labels), "task": task}
    return build_defense(name, epsilon=None if name == "none" else epsilon, split=split, seed=seed, **options)


def fine_tune(device: "DeviceSide", cloud: "CloudSide", train, steps: int, *, seed: int = 0, progress: bool = False) -> list[float]:
    """``steps`` cloud updates on batches released by one device holding ``train`` (a dataset
    with text/label columns), in seeded epoch order; returns the batch losses."""
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < steps * cloud.batch_size:
        epoch = list(range(len(train)))
        rng.shuffle(epoch)
        order += epoch
    losses: list[float] = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="fine-tuning", unit="step")
    for s in bar:
        rows = train.select(order[s * cloud.batch_size : (s + 1) * cloud.batch_size])
        hidden, mask, labels, _ = device.release(rows["text"], rows["label"])
        losses += cloud.train_on(hidden, mask, labels)
    return losses


class DeviceSide:
    """What a device computes. Holds no cloud state; token ids never leave this object."""

    def __init__(self, split: SplitModel, defense: Defense, *, max_length: int, audit_tokens: int = 512, anchors: torch.Tensor | None = None):
        self.split = split
        self.defense = defense
        self.max_length = max_length
        self.audit_tokens = audit_tokens
        self.anchors = anchors

    @torch.no_grad()
    def release(self, texts: list[str], labels: list[int] | torch.Tensor, *, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """Release ``texts``: returns hidden ``[N,T,d]`` (zero at padding), mask ``[N,T]``, labels ``[N]``, metrics."""
        if len(texts) == 0:
            raise ValueError("release needs at least one text")
        enc = self.split.tokenize(list(texts), self.max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        t0 = time.perf_counter()
        hidden = torch.cat([self.split.bottom(ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, len(ids), chunk)])
        t1 = time.perf_counter()
        released = torch.cat(
            [self.defense(hidden[i : i + chunk], ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, len(ids), chunk)]
        )
        t2 = time.perf_counter()
        metrics = {
            "num-examples": float(len(ids)),
            "num-tokens": float(mask.sum()),
            "bottom-seconds": t1 - t0,
            "defense-seconds": t2 - t1,
            "bytes-sent": float(released.numel() * 4 + mask.numel() + len(ids) * 8),
        }
        metrics.update(self._statement_metrics(ids, mask))
        audit = self.self_audit(released, ids, mask)
        if audit is not None:
            metrics["self-audit-knn"] = audit
        return released, mask, torch.as_tensor(labels, dtype=torch.long), metrics

    def _statement_metrics(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        statement = self.defense.privacy_statement(ids, mask)
        out = {}
        for src, dst in (
            ("effective_epsilon_min", "epsilon-effective-min"),
            ("effective_epsilon_median", "epsilon-effective-median"),
            ("effective_epsilon_max", "epsilon-effective-max"),
            ("slack_max", "slack-max"),
            ("epsilon_per_sequence_max", "epsilon-per-sequence-max"),
            ("slack_per_sequence_max", "slack-per-sequence-max"),
        ):
            if isinstance(statement.get(src), (int, float)):
                out[dst] = float(statement[src])
        return out

    def self_audit(self, released: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float | None:
        """KNN top-1 token recovery on (a seeded sample of) this release's real tokens."""
        if self.audit_tokens == 0 or self.anchors is None:
            return None
        from .mechanism.anchors import real_token_mask, self_audit

        rows, cols = real_token_mask(ids, mask, self.split.special_ids).nonzero(as_tuple=True)
        if len(rows) > self.audit_tokens:  # bounded cost per release: V x audit_tokens scores
            pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(len(rows)))[: self.audit_tokens]
            rows, cols = rows[pick], cols[pick]
        ones = torch.ones(1, len(rows), dtype=torch.long)
        return self_audit(released[rows, cols][None], ids[rows, cols][None], ones, self.anchors, self.split.special_ids)


class CloudSide:
    """The cloud's top model and optimiser (LoRA weights and the task head only)."""

    def __init__(self, split: SplitModel, *, learning_rate: float, batch_size: int, seed: int = 0):
        self.split = split
        self.batch_size = batch_size
        self.params = [p for p in split.top.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the top model has no trainable weights")
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def train_on(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """One optimiser step per batch of ``batch_size`` sequences, in order; returns batch losses."""
        self.split.top.train()
        losses = []
        for i in range(0, len(labels), self.batch_size):
            h, m, y = hidden[i : i + self.batch_size], mask[i : i + self.batch_size], labels[i : i + self.batch_size]
            width = int(m.sum(1).max()) if self.split.family == "encoder" else m.shape[1]
            if self.split.family == "encoder":  # right padding: drop all-pad columns
                h, m = h[:, :width], m[:, :width]
            loss = F.cross_entropy(self.split.top(h, m), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def evaluate(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        self.split.top.eval()
        logits = torch.cat(
            [self.split.top(hidden[i : i + 64], mask[i : i + 64]) for i in range(0, len(labels), 64)]
        )
        return classification_metrics(logits, labels, self.split.num_labels)

    def state(self) -> dict:
        return {"trainable": self.split.trainable_state(), "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint

    def load(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self.split.load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of ``logits [N, C]`` against ``labels [N]``."""
    pred = logits.argmax(-1)
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((pred == labels).float().mean()),
        "macro-f1": float(sum(f1s) / len(f1s)) if f1s else 0.0,
        "num-examples": float(len(labels)),
    }
