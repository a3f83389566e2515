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


def _support(grads: torch.Tensor) -> torch.Tensor:
    """Per-example gradients flattened over the positions where any example's is non-zero."""
    support = (grads != 0).any(dim=2).any(dim=0)
    return grads[:, support].reshape(grads.shape[0], -1).double() if bool(support.any()) else grads.reshape(grads.shape[0], -1).double()


def norm_attack(steps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The norm attack (Li et al. 2022): score each example by its gradient's norm. Reports the
    sign-free AUC (max(AUC, 1 - AUC), pooled over every example: the attacker is granted which
    class has the larger norms) and the accuracy of thresholding at each step's median with that
    orientation."""
    scores, labels, hits, total = [], [], 0, 0
    for grads, y in steps:
        s = _support(grads).norm(dim=1)
        scores.append(s)
        labels.append(y.long())
    s, y = torch.cat(scores), torch.cat(labels)
    value = auc(s, y)
    flip = value < 0.5
    for (grads, yy), st in zip(steps, scores):
        guess = (st > st.median()).long()
        guess = 1 - guess if flip else guess
        hits += int((guess == yy.long()).sum())
        total += len(yy)
    return {"auc": max(value, 1.0 - value), "accuracy": hits / max(total, 1), "examples": total}


def gradient_features(grads: torch.Tensor) -> torch.Tensor:
    """Per-example features ``[N, D + 3]`` a learned attacker reads from one step's gradients: the
    unit gradient (its direction), the log norm, the norm relative to the step's median, and the
    cosine with the step's mean gradient."""
    flat = _support(grads)
    norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = flat / norms
    mean = flat.mean(0, keepdim=True)
    cos = (flat @ mean.T) / (norms * mean.norm().clamp_min(1e-30))
    return torch.cat([unit, norms.log(), norms / norms.median(), cos], dim=1).float()


def learned_attack(auxiliary: list[tuple[torch.Tensor, torch.Tensor]], victim: list[tuple[torch.Tensor, torch.Tensor]],
                   *, epochs: int = 300, weight_decay: float = 1e-3, seed: int = 0) -> dict:
    """A learned label-inference attack: logistic regression on :func:`gradient_features`,
    trained on the attacker's own auxiliary labelled examples sent through the same protocol (the
    same middle, the same head initialisation, the same protection), tested on the victim's
    gradients. Reports plain AUC and accuracy (the attacker commits to its learned orientation,
    nothing is chosen on the victim's labels) and the majority rate."""
    xa = torch.cat([gradient_features(g) for g, _ in auxiliary])
    ya = torch.cat([y.long() for _, y in auxiliary]).float()
    xv = torch.cat([gradient_features(g) for g, _ in victim])
    yv = torch.cat([y.long() for _, y in victim])
    mu, sd = xa.mean(0), xa.std(0).clamp_min(1e-6)
    xa, xv = (xa - mu) / sd, (xv - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(xa.shape[1], generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xa @ w + b, ya) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = xv @ w + b
    majority = float(max((yv == 1).double().mean(), (yv == 0).double().mean()))
    return {"auc": auc(scores.double(), yv), "accuracy": float(((scores > 0).long() == yv).double().mean()),
            "majority": majority, "train-examples": int(len(ya)), "examples": int(len(yv))}


def next_token_recovery(grads: torch.Tensor, mask: torch.Tensor, next_ids: torch.Tensor, lm_head: torch.Tensor,
                        ) -> dict:
    """Generation: the direction attack against a tied ``lm_head`` ``[V, d]``. The gradient of the
    next-token loss at position t with respect to the head's input (before the final norm's
    scaling, approximately) is ``W^T (p - onehot(y_{t+1}))``, so ``-W g`` scores the true next
    token highest. Returns top-1 / top-10 recovery over real positions that have a next token."""
    pairs = (mask[:, 1:] * mask[:, :-1]).bool()
    g = grads[:, :-1][pairs].float()  # [P, d]
    y = next_ids[:, 1:][pairs]
    scores = -(g @ lm_head.float().T)
    top = scores.topk(10, dim=1).indices
    return {"top1": float((top[:, 0] == y).double().mean()), "top10": float((top == y[:, None]).any(1).double().mean()),
            "positions": int(len(y))}
