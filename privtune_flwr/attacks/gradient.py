"""Label inference from the gradients a u-shaped device returns (the cloud's view).

In the u-shaped protocol the device keeps its labels, but it sends back ``d loss / d outputs`` for
every example. For a classifier that gradient is ``(p - onehot(y))`` pushed back through the head,
so its direction depends on the label: examples of one class point one way, the other class the
other way (the direction attack of label-leakage studies of split learning). The attacker here:

* per step, stacks the per-example gradients (flattened), takes their top principal direction and
  scores each example by its projection (no knowledge of the head needed);
* resolves the sign with one example whose label it knows (a common assumption), and also
  reports the sign-free AUC, so the number does not rest on that assumption.
"""

from __future__ import annotations

import torch


def projection_scores(gradients: torch.Tensor) -> torch.Tensor:
    """Scores ``[N]``: each example's gradient projected on the batch's top principal direction."""
    flat = gradients.reshape(gradients.shape[0], -1).double()
    centred = flat - flat.mean(0, keepdim=True)
    if centred.abs().max() == 0:
        return torch.zeros(flat.shape[0], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[0]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for ``labels == 1`` (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).double().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).double().mean()
    return float(greater + 0.5 * ties)


def label_inference(steps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Binary label inference over u-shaped steps ``[(gradients [N, T, d], labels [N]), ...]``.

    Returns ``accuracy`` (sign resolved with the first example of each step, whose label the
    attacker is assumed to know; that example is not scored), ``auc`` (sign-free: max(AUC, 1 - AUC)
    per step, averaged over steps with both classes) and ``majority`` (always guessing the more
    frequent class), so the number can be read against chance.
    """
    hits = total = 0
    aucs = []
    everything = []
    for grads, labels in steps:
        labels = labels.long()
        if labels.numel() < 3 or int(labels.max()) > 1:
            raise ValueError(f"label inference is binary and needs >= 3 examples per step; got labels {labels.tolist()}")
        scores = projection_scores(grads)
        known, rest = 0, torch.arange(1, len(labels))
        sign = 1.0 if (scores[known] >= 0) == bool(labels[known]) else -1.0
        guess = ((sign * scores[rest]) >= 0).long()
        hits += int((guess == labels[rest]).sum())
        total += len(rest)
        value = auc(scores, labels)
        if value == value:  # not NaN
            aucs.append(max(value, 1.0 - value))
        everything.append(labels[rest])
    seen = torch.cat(everything)
    majority = float(max((seen == 1).double().mean(), (seen == 0).double().mean()))
    return {"accuracy": hits / max(total, 1), "auc": sum(aucs) / len(aucs) if aucs else float("nan"),
            "majority": majority, "examples": total}
