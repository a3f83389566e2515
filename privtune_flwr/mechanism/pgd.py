"""OPT-1/OPT-3 (spec §2.3): the mean shift delta* by projected gradient descent, whole batch at once.

For one sequence, with x_i = h_i + delta_i and a linear pooling with weights w (masked mean:
w_i = 1/T; last token: a one-hot)::

    f(Delta) = sum_i ||x_i - t_i||^2 - lam sum_i ||x_i - a_i||^2 + mu ||sum_i w_i delta_i||^2
    grad_i   = 2 (1 - lam) x_i - 2 t_i + 2 lam a_i + 2 mu w_i sum_j w_j delta_j

subject to ||delta_i|| <= r. Each step moves token i by ``min(eta / ||grad_i||, 1 / L) * grad_i``
(``eta``: the most a token moves per step; ``L_b = 2|1 - lam| + 2 mu ||w_b||^2`` bounds the
curvature of sequence b), then projects each delta_i back onto its ball. A step size of at most ``1/L`` per token
makes every step a majorise-minimise step, so the objective never increases.
"""

from __future__ import annotations

import torch


def opt1_objective(
    delta: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, own: torch.Tensor,
    pool_weights: torch.Tensor, active: torch.Tensor, lam: float, mu: float,
) -> torch.Tensor:
    """OPT-1 value per sequence [B] for tensors [B, T, d] and pool weights / active mask [B, T]."""
    x = hidden + delta
    m = active.unsqueeze(-1).to(x.dtype)
    pull = ((x - targets).pow(2) * m).sum((1, 2))
    push = ((x - own).pow(2) * m).sum((1, 2))
    pooled = (pool_weights.unsqueeze(-1) * delta).sum(1)
    return pull - lam * push + mu * pooled.pow(2).sum(-1)


@torch.no_grad()
def solve_shift(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    own: torch.Tensor,
    pool_weights: torch.Tensor,
    active: torch.Tensor,
    *,
    radius: float,
    steps: int = 10,
    step_size: float | None = None,
    lam: float = 0.5,
    mu: float = 1.0,
    trace: list | None = None,
) -> torch.Tensor:
    """delta* [B, T, d] (zero where ``active`` [B, T] is False) with ||delta*_i|| <= radius.

    ``hidden``, ``targets`` (t_i) and ``own`` (the token's anchor a_i) are [B, T, d] in the units
    of the representation; ``pool_weights`` [B, T]; ``step_size`` defaults to ``0.1 * radius``.
    If ``trace`` is a list, the objective [B] before each step and after the last is appended.
    """
    if not radius > 0:
        raise ValueError(f"radius={radius!r} is outside the accepted range (0, inf)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"pgd_steps={steps!r} is outside the accepted range: an integer >= 0")
    eta = 0.1 * radius if step_size is None else float(step_size)
    dtype = hidden.dtype
    m = active.unsqueeze(-1).to(dtype)
    w = pool_weights.to(dtype) * active.to(dtype)
    # Curvature per sequence, not per batch: a sequence's shift must not depend on which other
    # sequences share its batch (release once re-sends an example from any batch bit-identically).
    curvature = 2.0 * abs(1.0 - lam) + 2.0 * mu * w.pow(2).sum(1)  # [B]
    inv_l = (1.0 / curvature.clamp_min(1e-12)).view(-1, 1, 1)
    # Constant part of the gradient, computed once per batch; every step below works in place
    # (about six passes over [B, T, d]), since the perturbation must stay cheap next to the bottom.
    const = hidden.mul(2.0 * (1.0 - lam)).add_(targets, alpha=-2.0).add_(own, alpha=2.0 * lam)
    row_w = w.unsqueeze(1)  # [B, 1, T]: pooling as a batched matmul
    col_w = (2.0 * mu) * w.unsqueeze(-1)  # [B, T, 1]
    delta = torch.zeros_like(hidden)
    grad = torch.empty_like(hidden)
    for _ in range(steps):
        if trace is not None:
            trace.append(opt1_objective(delta, hidden, targets, own, w, active, lam, mu))
        pooled = torch.bmm(row_w, delta)  # [B, 1, d]
        torch.add(const, delta, alpha=2.0 * (1.0 - lam), out=grad)
        grad.baddbmm_(col_w, pooled)
        gnorm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).clamp_min_(1e-12)
        step = torch.clamp(eta / gnorm, max=inv_l).mul_(m)
        delta.addcmul_(step, grad, value=-1.0)
        dnorm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True).clamp_min_(1e-12)
        delta.mul_(torch.clamp(radius / dnorm, max=1.0))
    if trace is not None:
        trace.append(opt1_objective(delta, hidden, targets, own, w, active, lam, mu))
    return delta


def pool_weights(pool, attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Weights w [B, T] of a linear pooling ``pool(hidden, mask) -> [B, d]``: pool(e_i) for each i."""
    b, t = attention_mask.shape
    eye = torch.eye(t, dtype=dtype, device=attention_mask.device).expand(b, t, t)
    return pool(eye, attention_mask)
