"""The public envelope of a defence's releases: the largest per-token norm an honest device sends.

The cloud derives it from the run config and the public model alone, so that a reply outside it is
a device misbehaving (rejected and counted per device, like any invalid reply:
``strategies.split_learning``). Each bound holds for an honest token except with probability at
most ``TAIL`` (1e-12, well under the 1e-9 per token asked for), from the noise's known law:

* the clean representation ``h`` (defence ``none``). An encoder's block ends in a LayerNorm, so
  ``||h|| <= max|gamma| sqrt(d) + ||beta||`` exactly (the normalised vector has norm <= sqrt(d));
  the bottom's last LayerNorm is public. A decoder's residual stream has no such bound: no
  envelope (``inf``) and only the schema's ``max-abs`` (docs/privacy.md, "Replies the cloud checks").
* ``dchi``: ``||h|| + ||z||`` with ``||z|| ~ Gamma(d, rate eps)``.
* ``privtune*``: ``||h|| + r + ||z||``, with the shift radius ``r <= 2 defense.privtune.radius-scale B`` (a multiple
  of the anchors' median distance, itself at most twice the clean bound ``B``) and ``||z|| ~
  Gamma(d, rate eps / s)`` at the largest public noise scale ``s`` (1 when continuous).
* ``gaussian``: ``min(||h||, C) + sigma chi_d`` tail; with ``clip = 0`` (calibrated from the anchors,
  whose norms are at most ``B``) ``C = B`` and the sigma of that clip, an upper bound.
* ``label-subspace``: ``c + U (U^T (h - c) + z)``: ``||c|| <= B`` (a mean of clean
  representations), ``||U^T (h - c)|| <= 2 B``, ``||z|| ~ Gamma(k, rate eps)``; specials are means
  (``<= B``).
* ``label-obfuscator``: its network's output has no public bound: no envelope (``inf``).

What no envelope detects: a release inside it that is wrong (other text, or the right text with
flipped labels). That is label noise to the top; its influence per round is bounded by the
cloud's per-batch gradient clipping (``train.max-grad-norm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TAIL = 1e-12  # per-token probability that an honest token exceeds its bound
MARGIN = 1.0 + 1e-4  # float32 rounding of the release's arithmetic


@dataclass(frozen=True)
class Envelope:
    max_token_norm: float  # inf: no bound beyond the schema's
    reason: str


def clean_norm_bound(split) -> float:
    """An exact upper bound on the norm of any token the bottom outputs (encoders: its last
    LayerNorm), else ``inf``."""
    if split.family != "encoder":
        return math.inf
    norms = [m for m in split.bottom.modules() if isinstance(m, torch.nn.LayerNorm)]
    if not norms:
        return math.inf
    ln = norms[-1]
    d = ln.normalized_shape[-1]
    gamma = ln.weight.detach().double() if ln.weight is not None else torch.ones(d, dtype=torch.float64)
    beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros(d, dtype=torch.float64)
    return float(gamma.abs().max() * math.sqrt(d) + beta.norm())


def gamma_tail(shape: int, rate: float, tail: float = TAIL) -> float:
    from scipy.stats import gamma

    return float(gamma.isf(tail, a=shape, scale=1.0 / rate))


def chi_tail(dim: int, tail: float = TAIL) -> float:
    from scipy.stats import chi2

    return float(math.sqrt(chi2.isf(tail, dim)))


def release_envelope(cfg, split) -> Envelope:
    """The envelope of ``cfg``'s defence on ``split`` (public: run config and model)."""
    from .accounting import public_scales

    bound = clean_norm_bound(split)
    d = int(split.hidden_size)
    name = cfg.defense
    if not math.isfinite(bound):
        return Envelope(math.inf, f"no public bound on {split.family} representations")
    if name == "none":
        total, why = bound, f"LayerNorm bound {bound:.4g}"
    elif name == "dchi":
        z = gamma_tail(d, cfg.epsilon)
        total, why = bound + z, f"{bound:.4g} + Gamma({d}, {cfg.epsilon:g}) tail {z:.4g}"
    elif name.startswith("privtune"):
        scales, continuous = public_scales(cfg.s_min, cfg.importance_levels, scaled=name != "privtune-noimp")
        s = max(max(scales), 1.0) if continuous else max(scales)
        shift = 0.0 if name == "privtune-nomean" else 2.0 * cfg.radius_scale * bound
        z = gamma_tail(d, cfg.epsilon / s)
        total, why = bound + shift + z, f"{bound:.4g} + shift {shift:.4g} + Gamma({d}, {cfg.epsilon / s:g}) tail {z:.4g}"
    elif name == "gaussian":
        from .mechanism.gaussian import analytic_gaussian_sigma

        clip = min(cfg.clip, bound) if cfg.clip else bound
        sigma = analytic_gaussian_sigma(cfg.epsilon, cfg.delta, 2.0 * (cfg.clip or bound))
        total, why = clip + sigma * chi_tail(d), f"clip {clip:.4g} + {sigma:.4g} x chi_{d} tail"
    elif name == "label-subspace":
        k = int(cfg.subspace_rank)
        z = gamma_tail(k, cfg.epsilon)
        total, why = 3.0 * bound + z, f"3 x {bound:.4g} + Gamma({k}, {cfg.epsilon:g}) tail {z:.4g}"
    else:
        return Envelope(math.inf, f"no public bound on {name!r} releases")
    return Envelope(total * MARGIN, why)


def token_norms(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.double().norm(dim=-1)[mask.bool()]
