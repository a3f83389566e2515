"""Defences applied on the device to the bottom's output before it is released.

Every defence is a ``torch.nn.Module`` with one call::

    released = defense(hidden, input_ids, attention_mask)   # [B, T, d] -> [B, T, d]

usable inside or outside Flower. Padding positions are zeroed in the release, so nothing about
them leaves the device. ``privacy_statement`` reports what the defence guarantees for a batch
(never a bare "epsilon-DP" claim).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .mechanism.anchors import check_graph_options, get_tables
from .mechanism.dchi import check_epsilon, sample_dchi
from .mechanism.gaussian import analytic_gaussian_sigma, check_delta
from .mechanism.importance import Importance
from .mechanism.pgd import pool_weights, solve_shift
from .models import SplitModel


class Defense(nn.Module):
    """Base class: input validation, padding handling and the registry entry point."""

    name = "base"

    def __init__(self, split: SplitModel, epsilon: float | None, seed: int = 0):
        super().__init__()
        self.hidden_size = split.hidden_size
        self.vocab_size = split.vocab_size
        self.epsilon = None if epsilon is None else check_epsilon(epsilon)
        self.generator = torch.Generator().manual_seed(int(seed))

    def check_inputs(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden has shape {tuple(hidden.shape)}; expected [batch, tokens, {self.hidden_size}]"
            )
        if tuple(input_ids.shape) != tuple(hidden.shape[:2]) or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                f"must both be {tuple(hidden.shape[:2])}"
            )
        # A sum is finite iff every term is (barring overflow, which the exact check then settles);
        # it is ~40x cheaper than an element-wise isfinite on a release-sized batch.
        if not torch.isfinite(hidden.sum()) and not torch.isfinite(hidden).all():
            bad = int((~torch.isfinite(hidden)).sum())
            raise ValueError(f"hidden holds {bad} NaN/Inf values; representations must be finite")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids span {int(input_ids.min())}..{int(input_ids.max())}; accepted: 0..{self.vocab_size - 1}"
            )

    def perturb(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # each registered defence overrides this

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.check_inputs(hidden, input_ids, attention_mask)
        released = self.perturb(hidden.float(), input_ids, attention_mask)
        if released.data_ptr() == hidden.data_ptr():  # never write into the caller's tensor
            released = released.clone()
        return released.mul_(attention_mask.unsqueeze(-1).to(released.dtype)).to(hidden.dtype)

    def privacy_statement(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> dict:
        return {"defense": self.name, "epsilon": self.epsilon, "guarantee": "none"}


class NoDefense(Defense):
    """Releases the representations unchanged: the utility upper bound."""

    name = "none"

    def perturb(self, hidden, input_ids, attention_mask):
        return hidden


class DChiDefense(Defense):
    """Isotropic d_chi noise with no mean shift and no importance scaling."""

    name = "dchi"

    def perturb(self, hidden, input_ids, attention_mask):
        noise = sample_dchi(tuple(hidden.shape[:2]), hidden.shape[-1], self.epsilon, generator=self.generator)
        return noise.to(hidden.device).add_(hidden)

    def privacy_statement(self, input_ids=None, attention_mask=None) -> dict:
        per_seq = None if attention_mask is None else attention_mask.sum(1).double()
        tokens = None if per_seq is None else int(per_seq.sum())
        return {
            "defense": self.name,
            "epsilon": self.epsilon,
            "guarantee": "d_chi-privacy per token (Euclidean metric on representations)",
            "effective_epsilon_min": self.epsilon,
            "effective_epsilon_median": self.epsilon,
            "effective_epsilon_max": self.epsilon,
            "slack": 0.0,
            "tokens": tokens,
            "epsilon_per_sequence_mean": None if not tokens else float(per_seq.mean() * self.epsilon),
            "epsilon_per_sequence_max": None if not tokens else float(per_seq.max() * self.epsilon),
            "composition": "per sequence the parameter adds up over its tokens; over releases and rounds "
            "(fresh noise each release) it adds up again",
        }


def _spread(values: torch.Tensor) -> tuple[float, float, float]:
    if values.numel() == 0:
        return (float("nan"),) * 3
    values = values.double()
    return float(values.min()), float(values.median()), float(values.max())


def _number(name: str, value, low: float, high: float = math.inf, *, low_open: bool = True, high_open: bool = False, integer: bool = False):
    """Validate one option; the error names the value and the accepted range."""
    brackets = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open or high == math.inf else "]")
    accepted = f"{'an integer' if integer else 'a number'} in {brackets}"
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name}={value!r} is not accepted; accepted: {accepted}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; accepted: {accepted}") from None
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if math.isnan(number) or below or above:
        raise ValueError(f"{name}={value!r} is outside the accepted range: {accepted}")
    return int(value) if integer else number


class GaussianDefense(Defense):
    """DP-Forward-style baseline: clip each token to norm ``clip``, add N(0, sigma^2 I).

    sigma comes from the analytic Gaussian mechanism (Balle & Wang 2018) at (epsilon, delta) with
    L2 sensitivity ``2 * clip`` (replacing one token). ``clip=None`` uses the median norm of the
    anchor table (regular tokens), a typical token norm at the split layer.
    """

    name = "gaussian"

    def __init__(self, split: SplitModel, epsilon: float, seed: int = 0, *, delta: float = 1e-5, clip: float | None = None):
        super().__init__(split, epsilon, seed)
        self.delta = check_delta(delta)
        if clip is None:
            anchors = get_tables(split).anchors
            regular = torch.ones(anchors.shape[0], dtype=torch.bool)
            regular[split.special_ids[split.special_ids < anchors.shape[0]]] = False
            clip = float(anchors[regular].norm(dim=-1).median())
        self.clip = _number("clip", clip, 0.0)
        self.sigma = analytic_gaussian_sigma(self.epsilon, self.delta, 2.0 * self.clip)

    def perturb(self, hidden, input_ids, attention_mask):
        norms = hidden.norm(dim=-1, keepdim=True)
        clipped = hidden * torch.clamp(self.clip / norms.clamp_min(1e-12), max=1.0)
        noise = torch.randn(hidden.shape, generator=self.generator, dtype=torch.float32).to(hidden.device)
        return clipped + self.sigma * noise

    def privacy_statement(self, input_ids=None, attention_mask=None) -> dict:
        per_seq = None if attention_mask is None else attention_mask.sum(1).double()
        out = {
            "defense": self.name,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "sigma": self.sigma,
            "clip": self.clip,
            "sensitivity": 2.0 * self.clip,
            "guarantee": "(epsilon, delta)-DP per token representation (replace-one-token, L2 sensitivity 2*clip), "
            "analytic Gaussian mechanism",
            "composition": "per sequence and over releases/rounds, (epsilon, delta) compose additively "
            "(basic composition: T tokens give (T*epsilon, T*delta))",
        }
        if per_seq is not None and per_seq.numel():
            out.update(
                tokens=int(per_seq.sum()),
                epsilon_per_sequence_mean=float(per_seq.mean() * self.epsilon),
                epsilon_per_sequence_max=float(per_seq.max() * self.epsilon),
                delta_per_sequence_max=float(per_seq.max() * self.delta),
            )
        return out


class PrivTuneDefense(Defense):
    """PrivTune (spec §2): ``released_i = h_i + delta*_i + s_i z_i`` on every real token.

    ``delta*`` solves OPT-1 by PGD (pull towards the n-hop ring target, push away from the own
    anchor, keep the pooled meaning) within ||delta_i|| <= r; ``z_i`` is d_chi noise at ``epsilon``;
    ``s_i = 1 - (1 - s_min) imp(w_i)``. Special tokens carry no private content and are not
    shifted (they still get noise). ``importance`` is an :class:`Importance`, a [V] tensor in
    [0, 1], a dict ``{"sequences", "labels", "task"}`` (built here with ``alpha``), or None: every
    regular token then gets importance 0.5 (s_i = (1 + s_min) / 2), specials 0.
    """

    name = "privtune"
    use_shift = True
    use_importance = True
    target_mode = "centroid"  # "centroid" | "sampled" (ring member per release) | "random" (any token per release)

    def __init__(
        self,
        split: SplitModel,
        epsilon: float,
        seed: int = 0,
        *,
        n_hops: int = 2,
        k: int = 8,
        max_neighbours: int = 16,
        radius_scale: float = 1.0,
        pgd_steps: int = 10,
        lam: float = 0.5,
        mu: float = 1.0,
        s_min: float = 0.5,
        alpha: float = 0.5,
        importance=None,
    ):
        super().__init__(split, epsilon, seed)
        check_graph_options(k, n_hops, max_neighbours)
        self.radius_scale = _number("radius_scale", radius_scale, 0.0)
        self.pgd_steps = _number("pgd_steps", pgd_steps, 0, low_open=False, integer=True)
        self.lam = _number("lam", lam, 0.0, low_open=False)
        self.mu = _number("mu", mu, 0.0, low_open=False)
        self.s_min = _number("s_min", s_min, 0.0, 1.0)
        self.alpha = _number("alpha", alpha, 0.0, 1.0, low_open=False)
        self.n_hops, self.k, self.max_neighbours = n_hops, k, max_neighbours

        tables = get_tables(split, k=k, n_hops=n_hops, max_neighbours=max_neighbours)
        self.tables = tables
        self.radius = self.radius_scale * tables.median_distance
        # Non-persistent buffers: they follow .to(device) but stay out of state_dict.
        self.register_buffer("anchors", tables.anchors, persistent=False)
        self.register_buffer("rings", tables.rings, persistent=False)
        self.register_buffer("ring_sizes", tables.ring_sizes, persistent=False)
        self.register_buffer("targets", tables.targets, persistent=False)
        self.register_buffer("special_ids", split.special_ids, persistent=False)
        self.register_buffer("importance", self._importance_values(importance, split), persistent=False)
        regular = torch.ones(self.vocab_size, dtype=torch.bool)
        regular[self.special_ids[self.special_ids < self.vocab_size]] = False
        self.register_buffer("regular_ids", torch.nonzero(regular).squeeze(1), persistent=False)
        self._pool = split.pool

    def _importance_values(self, importance, split: SplitModel) -> torch.Tensor:
        if importance is None:
            return Importance.uniform(self.vocab_size, split.special_ids).values
        if isinstance(importance, dict):
            importance = Importance(
                importance["sequences"], importance.get("labels"), importance.get("task", "classification"),
                vocab_size=self.vocab_size, special_ids=split.special_ids, alpha=self.alpha,
            )
        values = importance.values if isinstance(importance, Importance) else torch.as_tensor(importance, dtype=torch.float32)
        if tuple(values.shape) != (self.vocab_size,):
            raise ValueError(f"importance has shape {tuple(values.shape)}; expected [{self.vocab_size}] (one value per vocabulary id)")
        if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(f"importance values span {float(values.min())}..{float(values.max())}; accepted: [0, 1]")
        return values.float().clone()

    def check_inputs(self, hidden, input_ids, attention_mask) -> None:
        if hidden.dim() == 3 and hidden.shape[-1] != self.anchors.shape[1]:
            raise ValueError(
                f"hidden size {hidden.shape[-1]} differs from the anchors' hidden size {self.anchors.shape[1]}; "
                f"accepted: representations [batch, tokens, {self.anchors.shape[1]}] from the same split"
            )
        super().check_inputs(hidden, input_ids, attention_mask)

    def noise_scale(self, input_ids: torch.Tensor) -> torch.Tensor:
        """s_i for each token id: same shape as ``input_ids`` (float32, in [s_min, 1])."""
        if not self.use_importance:
            return torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        return 1.0 - (1.0 - self.s_min) * self.importance[input_ids]

    def token_targets(self, input_ids: torch.Tensor) -> torch.Tensor:
        """t_i [B, T, d] for this release (fresh draws for the sampled/random variants)."""
        if self.target_mode == "centroid":
            return self.targets[input_ids]
        u = torch.rand(input_ids.shape, generator=self.generator).to(input_ids.device)
        if self.target_mode == "sampled":
            sizes = self.ring_sizes[input_ids].clamp_min(1)
            slot = torch.minimum((u * sizes).long(), sizes - 1)
            member = self.rings[input_ids, slot].clamp_min(0)
        else:
            pick = torch.minimum((u * len(self.regular_ids)).long(), torch.tensor(len(self.regular_ids) - 1))
            member = self.regular_ids[pick]
        return self.anchors[member]

    def mean_shift(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """delta* [B, T, d] of OPT-3 (zero at specials and padding); ||delta*_i|| <= radius."""
        active = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        return solve_shift(
            hidden, self.token_targets(input_ids), self.anchors[input_ids],
            pool_weights(self._pool, attention_mask, hidden.dtype), active,
            radius=self.radius, steps=self.pgd_steps, lam=self.lam, mu=self.mu,
        )

    def perturb(self, hidden, input_ids, attention_mask):
        noise = sample_dchi(tuple(hidden.shape[:2]), hidden.shape[-1], self.epsilon, generator=self.generator).to(hidden.device)
        noise.mul_(self.noise_scale(input_ids).unsqueeze(-1)).add_(hidden)
        if self.use_shift:
            noise.add_(self.mean_shift(hidden, input_ids, attention_mask))
        return noise

    def privacy_statement(self, input_ids=None, attention_mask=None) -> dict:
        """§2.6: effective epsilon/s_i and slack 2 r epsilon/s_i per token, and their sums per sequence."""
        radius = self.radius if self.use_shift else 0.0
        if input_ids is None:
            ids = self.regular_ids.unsqueeze(0)  # over the vocabulary when no batch is given
            mask = torch.ones_like(ids)
        else:
            ids, mask = input_ids, (torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        real = mask.bool()
        eff = self.epsilon / self.noise_scale(ids).double()
        slack = 2.0 * radius * eff
        eff_lo, eff_med, eff_hi = _spread(eff[real])
        sl_lo, sl_med, sl_hi = _spread(slack[real])
        seq_eps = (eff * real).sum(1)
        seq_slack = (slack * real).sum(1)
        return {
            "defense": self.name,
            "epsilon": self.epsilon,
            "radius": radius,
            "guarantee": "metric (d_chi) privacy per token on the Euclidean distance of split-layer representations: "
            "output densities differ by at most exp((epsilon/s_i) * (||h - h'|| + 2r)), i.e. effective "
            "parameter epsilon/s_i with additive slack 2*r*epsilon/s_i",
            "effective_epsilon_min": eff_lo,
            "effective_epsilon_median": eff_med,
            "effective_epsilon_max": eff_hi,
            "slack_min": sl_lo,
            "slack_median": sl_med,
            "slack_max": sl_hi,
            "tokens": int(real.sum()),
            "epsilon_per_sequence_mean": float(seq_eps.mean()) if input_ids is not None else None,
            "epsilon_per_sequence_max": float(seq_eps.max()) if input_ids is not None else None,
            "slack_per_sequence_mean": float(seq_slack.mean()) if input_ids is not None else None,
            "slack_per_sequence_max": float(seq_slack.max()) if input_ids is not None else None,
            "composition": "per sequence the effective parameters and slacks add up over its tokens; "
            "over releases and rounds (fresh noise each release) they add up again",
        }


class PrivTuneNoImportance(PrivTuneDefense):
    """Ablation: s_i = 1 for every token."""

    name = "privtune-noimp"
    use_importance = False


class PrivTuneNoMean(PrivTuneDefense):
    """Ablation: delta* = 0 (d_chi noise scaled by importance)."""

    name = "privtune-nomean"
    use_shift = False


class PrivTuneRandomTarget(PrivTuneDefense):
    """Ablation: t_i is the anchor of a uniformly random regular token, drawn per release."""

    name = "privtune-random-target"
    target_mode = "random"


class PrivTuneSampledTarget(PrivTuneDefense):
    """Variant: t_i is the anchor of a member of N_n(w_i) drawn uniformly per release."""

    name = "privtune-sampled-target"
    target_mode = "sampled"


DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        NoDefense, DChiDefense, GaussianDefense, PrivTuneDefense, PrivTuneNoImportance,
        PrivTuneNoMean, PrivTuneRandomTarget, PrivTuneSampledTarget,
    )
}

# Every option any defence takes, with its default. A defence ignores the options of the others,
# so an app can pass its whole configuration to any defence.
OPTIONS = {
    "n_hops": 2, "k": 8, "max_neighbours": 16, "radius_scale": 1.0, "pgd_steps": 10, "lam": 0.5,
    "mu": 1.0, "s_min": 0.5, "alpha": 0.5, "importance": None, "delta": 1e-5, "clip": None,
}


def build_defense(name: str, *, epsilon: float | None = None, split: SplitModel, seed: int = 0, **options) -> Defense:
    """Create the defence ``name`` for ``split`` at privacy parameter ``epsilon``.

    ``options`` are the knobs of ``OPTIONS``; those a defence does not use are ignored, unknown
    names raise. ``none`` ignores ``epsilon``.
    """
    if name not in DEFENSES:
        raise ValueError(f"defense={name!r} is unknown; accepted: {', '.join(DEFENSES)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown defence option(s) {unknown}; accepted: {', '.join(OPTIONS)}")
    cls = DEFENSES[name]
    if cls is NoDefense:
        return cls(split, None, seed)  # epsilon has no meaning without noise
    if epsilon is None:
        raise ValueError(f"defense={name!r} needs epsilon; accepted: a finite value > 0")
    check_epsilon(epsilon)
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(split, epsilon, seed, **{k: v for k, v in options.items() if k in accepted})
