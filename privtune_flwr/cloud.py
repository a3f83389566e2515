"""The cloud half of split fine-tuning: the top model, its LoRA optimiser, training and evaluation.

:class:`CloudSide` is what the strategy (:mod:`strategies.split_learning`) drives in a Flower run;
:func:`fine_tune` drives it in-process against one :class:`~privtune_flwr.device.DeviceSide` (the
centralised baseline and the privacy-utility sweep), so every path trains the same way. The cloud
sees only what a device releases: representations, the attention mask and (vanilla protocol)
labels.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import SplitModel


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


def fine_tune(device, cloud: "CloudSide", train, steps: int, *, seed: int = 0, progress: bool = False) -> list[float]:
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
        rel = device.release(rows["text"], rows["label"])
        losses += cloud.train_on(rel.hidden, rel.attention_mask, rel.labels)
    return losses
