"""Scores of the attacks (§4): plain functions on hand-checkable inputs.

All scores are in [0, 1]; higher means the attacker learned more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_set_f1(predicted: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Mean over sequences of the F1 between the predicted and the true *set* of tokens.

    ``predicted[i]`` and ``truth[i]`` are token-id lists of sequence ``i`` (special tokens already
    removed). A sequence whose two sets are both empty carries no evidence and is skipped;
    if every sequence is skipped the score is 0.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"predicted has {len(predicted)} sequences but truth has {len(truth)}")
    scores = []
    for pred, true in zip(predicted, truth):
        p, t = set(pred), set(true)
        if not p and not t:
            continue
        hit = len(p & t)
        scores.append(0.0 if hit == 0 else 2 * hit / (len(p) + len(t)))
    return float(sum(scores) / len(scores)) if scores else 0.0


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j-1] of the previous line
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diag + 1 if x == y else max(row[j], row[j - 1])
            diag = above
    return row[-1]


def rouge_l(predicted: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 of one token sequence against its reference (LCS-based, beta = 1)."""
    lcs = lcs_length(predicted, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predicted: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Mean ROUGE-L F1 over sequences with a non-empty reference."""
    if len(predicted) != len(truth):
        raise ValueError(f"predicted has {len(predicted)} sequences but truth has {len(truth)}")
    scores = [rouge_l(p, t) for p, t in zip(predicted, truth) if len(t)]
    return float(sum(scores) / len(scores)) if scores else 0.0


def balanced_accuracy(truth: torch.Tensor, predicted: torch.Tensor) -> float:
    """Mean over the classes present in ``truth`` of the recall of that class.

    ``truth``/``predicted``: integer (or bool) tensors ``[N]``. For a binary task this is the mean
    of the true-positive and true-negative rates, so a constant guess scores 0.5 whatever the
    class balance; that is why keyword inference (rare keywords) is scored this way.
    """
    truth, predicted = truth.long().flatten(), predicted.long().flatten()
    if truth.numel() == 0 or truth.shape != predicted.shape:
        raise ValueError(f"truth {tuple(truth.shape)} and predicted {tuple(predicted.shape)} must be equal, non-empty")
    recalls = [(predicted[truth == c] == c).float().mean() for c in truth.unique()]
    return float(torch.stack(recalls).mean())


def recall_precision_at(scores: torch.Tensor, targets: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Micro recall and precision of the decisions ``scores >= threshold`` against ``targets``.

    ``scores``: ``[N, K]`` probabilities; ``targets``: ``[N, K]`` 0/1 (is word k in sequence n).
    Micro-averaging pools every (sequence, word) pair. Recall is 0 when there is nothing to
    find; precision is 0 when nothing is predicted (a silent attacker claims nothing).
    """
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
    decided, targets = scores >= threshold, targets.bool()
    hits = int((decided & targets).sum())
    positives, claimed = int(targets.sum()), int(decided.sum())
    return (hits / positives if positives else 0.0, hits / claimed if claimed else 0.0)


def best_threshold(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The decision threshold that maximises micro F1 of ``scores >= t`` on (held-out auxiliary) data.

    F1 rather than recall: recall alone is maximised by claiming every word (threshold 0),
    which tells nothing. Candidates are the observed scores; ties go to the higher threshold.
    With no positive at all, 0.5 is returned.
    """
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
    flat, truth = scores.flatten().double(), targets.flatten().bool()
    positives = int(truth.sum())
    if positives == 0 or flat.numel() == 0:
        return 0.5
    order = torch.argsort(flat, descending=True)
    ranked, hit = flat[order], truth[order].double()
    tp = torch.cumsum(hit, 0)
    claimed = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    f1 = 2 * tp / (claimed + positives)
    # A threshold can only sit at the last of a run of equal scores.
    last_of_run = torch.ones_like(ranked, dtype=torch.bool)
    last_of_run[:-1] = ranked[:-1] != ranked[1:]
    f1 = torch.where(last_of_run, f1, torch.full_like(f1, -1.0))
    return float(ranked[int(torch.argmax(f1))])
