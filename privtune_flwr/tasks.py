"""The losses and metrics of the two tasks, which both halves of a split use.

A low module: it imports only torch. The cloud (``cloud``, the strategies) and the device
(``device``) read their losses and scores from here, so neither imports the other for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Classification: cross-entropy of ``logits [N, C]`` against labels ``[N]``. Generation: the
    next-token loss of ``logits [N, T, V]`` against token ids ``[N, T]`` over real positions."""
    if task == "classification":
        return F.cross_entropy(logits, targets)
    pairs = (mask[:, 1:] * mask[:, :-1]).bool()
    return F.cross_entropy(logits[:, :-1][pairs], targets[:, 1:][pairs])


def next_token_nll(logits: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of ``logits [N, T, V]`` over every real pair of positions
    of ``ids [N, T]``, and the number of pairs (for a corpus perplexity)."""
    pairs = (mask[:, 1:] * mask[:, :-1]).bool()
    loss = F.cross_entropy(logits[:, :-1][pairs].float(), ids[:, 1:][pairs], reduction="sum")
    return float(loss), int(pairs.sum())


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
