"""Defences applied on the device to the bottom's output before it is released.

Every defence is a ``torch.nn.Module`` with one call::

    released = defense(hidden, input_ids, attention_mask)   # [B, T, d] -> [B, T, d]

usable inside or outside Flower. Padding positions are zeroed in the release, so nothing about
them leaves the device. Noise comes from the device's secret :class:`NoiseKey` (or, for research,
a stated seed), one keyed stream per example. ``statement()`` says what the defence guarantees
(:mod:`privtune_flwr.accounting`; never a bare "epsilon-DP" claim).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import secrets
from dataclasses import asdict

import torch
from torch import nn

from . import registry
from .accounting import RELEASE_MODES, PrivacyStatement, public_scales
from .mechanism.anchors import bottom_fingerprint, check_graph_options, get_tables
from .mechanism.dchi import check_epsilon, real_spans, sample_dchi_keyed
from .mechanism.noise_key import NoiseKey, NoiseStream
from .mechanism.gaussian import analytic_gaussian_sigma, check_delta
from .mechanism.importance import Importance
from .mechanism.obfuscator import LAYERS, Obfuscator, feature_map
from .mechanism.pgd import pool_weights, solve_shift
from .mechanism.subspace import Subspace
from .models import SplitModel
from .registry import GaussianOptions, LabelObfuscatorOptions, LabelSubspaceOptions, PrivTuneOptions


class Defense(nn.Module):
    """Base class: input validation, padding handling, the noise key and the registry entry point.

    ``key``: the device's :class:`NoiseKey`; ``seed``: research reproducibility only (anyone who
    knows it can remove the noise; the statement says so); neither: a fresh key from OS entropy.
    ``release``: ``"once"`` (default; an example's noise is a pure function of the key, the
    configuration and its tokens, so re-sending it re-sends the identical tensor) or ``"fresh"``.
    """

    name = "base"

    def __init__(self, split: SplitModel, epsilon: float | None, *, key: NoiseKey | None = None,
                 seed: int | str | None = None, release: str = "once"):
        super().__init__()
        self.hidden_size = split.hidden_size
        self.vocab_size = split.vocab_size
        self.epsilon = None if epsilon is None else check_epsilon(epsilon)
        if key is not None and seed is not None:
            raise ValueError("give key= (a device's secret) or seed= (reproducible research noise), not both")
        if key is not None and not isinstance(key, NoiseKey):
            raise ValueError(f"key must be a NoiseKey, got {type(key).__name__}")
        self.key = key if key is not None else (NoiseKey.from_seed(seed) if seed is not None else NoiseKey.fresh())
        if release not in RELEASE_MODES:
            raise ValueError(f"release={release!r} is not accepted; accepted: {', '.join(RELEASE_MODES)}")
        self.release = release
        self._model_id = f"{split.name}|{split.split_layer}|{bottom_fingerprint(split)}"

    @property
    def reproducible(self) -> bool:
        return self.key.reproducible

    def mechanism_config(self) -> dict:
        """Everything that shapes a release; a different value gives independent noise."""
        return {"defense": self.name, "epsilon": self.epsilon, "model": self._model_id}

    def fingerprint(self) -> bytes:
        """Digest of :meth:`mechanism_config`: the context of every noise stream. Recomputed when
        any attribute or buffer it covers changes, so a change (e.g. of importance) can never reuse
        old noise at a new scale."""
        token = self._fingerprint_token()
        cached = self.__dict__.get("_fingerprint_cache")
        if cached is None or cached[0] != token:
            blob = json.dumps(self.mechanism_config(), sort_keys=True, default=str).encode()
            cached = (token, hashlib.sha256(blob).digest())
            self.__dict__["_fingerprint_cache"] = cached
        return cached[1]

    def _fingerprint_token(self) -> tuple:
        """Cheap summary of the state the fingerprint covers (buffers by identity and version)."""
        plain = tuple((k, v) for k, v in sorted(vars(self).items())
                      if isinstance(v, (int, float, str, bool, type(None))) and not k.startswith("_"))
        tensors = tuple((k, b.data_ptr(), b._version) for k, b in self._buffers.items() if b is not None)
        return plain + tensors

    def streams(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, spans=False) -> list[NoiseStream]:
        """One keyed stream per sequence, from its real tokens (padding is not part of the example).
        ``spans``: :func:`real_spans` of the mask if already known."""
        context = self.fingerprint()
        fresh = self.release == "fresh"
        ids = input_ids.cpu().numpy()
        spans = real_spans(attention_mask) if spans is False else spans
        if spans is None:
            real = attention_mask.bool().cpu().numpy()
            rows = [ids[b][real[b]] for b in range(ids.shape[0])]
        else:
            rows = [ids[b, start:start + count] for b, (start, count) in enumerate(spans)]
        return [self.key.stream(context, row, secrets.token_bytes(16) if fresh else b"") for row in rows]

    @staticmethod
    def scatter(rows: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-sequence draws ``[n_b, ...]`` placed at the real positions of a ``[B, T, ...]`` tensor."""
        real = attention_mask.bool()
        tail = rows[0].shape[1:] if rows else ()
        out = torch.zeros(*real.shape, *tail, dtype=rows[0].dtype if rows else torch.float32)
        if rows:
            out[real] = torch.cat(rows)
        return out

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

    def statement(self) -> PrivacyStatement:
        """What this defence guarantees (public; see :mod:`privtune_flwr.accounting`): its registry
        entry's statement at this defence's options, as the cloud states it from a run config."""
        spec = registry.get(self.name)
        return spec.statement(spec.options_from(self), epsilon=self.epsilon, radius=getattr(self, "radius", 0.0),
                              **self._key_words())

    def _key_words(self) -> dict:
        return {"release": self.release, "reproducible": self.key.reproducible, "key_source": self.key.source}


class NoDefense(Defense):
    """Releases the representations unchanged: the utility upper bound."""

    name = "none"

    def perturb(self, hidden, input_ids, attention_mask):
        return hidden


class DChiDefense(Defense):
    """Isotropic d_chi noise with no mean shift and no importance scaling."""

    name = "dchi"

    def perturb(self, hidden, input_ids, attention_mask):
        spans = real_spans(attention_mask)
        streams = self.streams(input_ids, attention_mask, spans)
        gaussian, scale = sample_dchi_keyed(streams, attention_mask, hidden.shape[-1], self.epsilon, spans)
        return torch.addcmul(hidden, gaussian.to(hidden.device), scale.to(hidden.device).unsqueeze(-1))


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

    def __init__(self, split: SplitModel, epsilon: float, *, key=None, seed=None, release="once",
                 delta: float = GaussianOptions.delta, clip: float | None = GaussianOptions.clip):
        super().__init__(split, epsilon, key=key, seed=seed, release=release)
        self.delta = check_delta(delta)
        if clip is None or (clip == 0 and not isinstance(clip, bool)):  # 0 (a run config's "auto") or None
            anchors = get_tables(split, **asdict(registry.GraphOptions())).anchors
            regular = torch.ones(anchors.shape[0], dtype=torch.bool)
            regular[split.special_ids[split.special_ids < anchors.shape[0]]] = False
            clip = float(anchors[regular].norm(dim=-1).median())
        self.clip = _number("clip", clip, 0.0)
        self.sigma = analytic_gaussian_sigma(self.epsilon, self.delta, 2.0 * self.clip)

    def mechanism_config(self) -> dict:
        return {**super().mechanism_config(), "delta": self.delta, "clip": self.clip}

    def perturb(self, hidden, input_ids, attention_mask):
        norms = hidden.norm(dim=-1, keepdim=True)
        clipped = hidden * torch.clamp(self.clip / norms.clamp_min(1e-12), max=1.0)
        d = hidden.shape[-1]
        lengths = attention_mask.bool().sum(1).tolist()
        rows = [st.normal((n, d)) for st, n in zip(self.streams(input_ids, attention_mask), lengths)]
        return clipped + self.sigma * self.scatter(rows, attention_mask).to(hidden.device)


class PrivTuneDefense(Defense):
    """PrivTune (spec §2): ``released_i = h_i + delta*_i + s_i z_i`` on every real token.

    ``delta*`` solves OPT-1 by PGD (pull towards the n-hop ring target, push away from the own
    anchor, keep the pooled meaning) within ||delta_i|| <= r; ``z_i`` is d_chi noise at ``epsilon``;
    ``s_i = 1 - (1 - s_min) q(imp(w_i))``. Special tokens carry no private content and are not
    shifted (they still get noise). ``importance`` is an :class:`Importance`, a [V] tensor in
    [0, 1], a dict ``{"sequences", "labels", "task"}`` (built here with ``alpha``), or None: every
    regular token then gets importance 0.5, specials 0.

    ``importance_levels`` (q): ``L >= 2`` rounds importance to L evenly spaced public levels, so the
    noise scale takes one of L public values and the per-token bound holds within a level (the
    level itself is revealed); ``1`` gives every token scale 1; ``0`` keeps the paper's continuous
    scale, under which no bound holds between tokens of different importance (see
    :mod:`privtune_flwr.accounting`).
    """

    name = "privtune"
    use_shift = True
    use_importance = True
    target_mode = "centroid"  # "centroid" | "sampled" (ring member per release) | "random" (any token per release)

    def __init__(
        self,
        split: SplitModel,
        epsilon: float,
        *,
        key=None,
        seed=None,
        release="once",
        n_hops: int = PrivTuneOptions.n_hops,
        k: int = PrivTuneOptions.k,
        max_neighbours: int = PrivTuneOptions.max_neighbours,
        radius_scale: float = PrivTuneOptions.radius_scale,
        pgd_steps: int = PrivTuneOptions.pgd_steps,
        lam: float = PrivTuneOptions.lam,
        mu: float = PrivTuneOptions.mu,
        s_min: float = PrivTuneOptions.s_min,
        alpha: float = PrivTuneOptions.alpha,
        importance_levels: int = PrivTuneOptions.importance_levels,
        importance=None,
    ):
        super().__init__(split, epsilon, key=key, seed=seed, release=release)
        check_graph_options(k, n_hops, max_neighbours)
        self.radius_scale = _number("radius_scale", radius_scale, 0.0)
        self.pgd_steps = _number("pgd_steps", pgd_steps, 0, low_open=False, integer=True)
        self.lam = _number("lam", lam, 0.0, low_open=False)
        self.mu = _number("mu", mu, 0.0, low_open=False)
        self.s_min = _number("s_min", s_min, 0.0, 1.0)
        self.alpha = _number("alpha", alpha, 0.0, 1.0, low_open=False)
        self.importance_levels = _number("importance_levels", importance_levels, 0, 64, low_open=False, integer=True)
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
        self._tables_id = str(sorted(tables.key.items()))

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

    def mechanism_config(self) -> dict:
        importance = hashlib.sha256(self.importance.detach().cpu().numpy().tobytes()).hexdigest()
        return {
            **super().mechanism_config(), "tables": self._tables_id, "radius": self.radius, "pgd_steps": self.pgd_steps,
            "lam": self.lam, "mu": self.mu, "s_min": self.s_min, "levels": self.importance_levels,
            "importance": importance, "shift": self.use_shift, "scaled": self.use_importance, "target": self.target_mode,
        }

    def check_inputs(self, hidden, input_ids, attention_mask) -> None:
        if hidden.dim() == 3 and hidden.shape[-1] != self.anchors.shape[1]:
            raise ValueError(
                f"hidden size {hidden.shape[-1]} differs from the anchors' hidden size {self.anchors.shape[1]}; "
                f"accepted: representations [batch, tokens, {self.anchors.shape[1]}] from the same split"
            )
        super().check_inputs(hidden, input_ids, attention_mask)

    @property
    def scales(self) -> tuple[float, ...]:
        """The public noise scales s (with ``importance_levels = 0``: the range's ends)."""
        return public_scales(self.s_min, self.importance_levels, scaled=self.use_importance)[0]

    def noise_scale(self, input_ids: torch.Tensor) -> torch.Tensor:
        """s_i for each token id: same shape as ``input_ids`` (float32, in [s_min, 1])."""
        if not self.use_importance or self.importance_levels == 1:
            return torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        imp = self.importance[input_ids]
        if self.importance_levels >= 2:
            top = self.importance_levels - 1
            imp = torch.round(imp * top) / top
        return 1.0 - (1.0 - self.s_min) * imp

    def token_targets(self, input_ids: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """t_i [B, T, d] for this release; the sampled/random variants read ``uniforms`` [B, T]."""
        if self.target_mode == "centroid":
            return self.targets[input_ids]
        u = uniforms.to(input_ids.device)
        if self.target_mode == "sampled":
            sizes = self.ring_sizes[input_ids].clamp_min(1)
            slot = torch.minimum((u * sizes).long(), sizes - 1)
            member = self.rings[input_ids, slot].clamp_min(0)
        else:
            pick = torch.minimum((u * len(self.regular_ids)).long(), torch.tensor(len(self.regular_ids) - 1))
            member = self.regular_ids[pick]
        return self.anchors[member]

    def mean_shift(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """delta* [B, T, d] of OPT-3 (zero at specials and padding); ||delta*_i|| <= radius."""
        active = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        return solve_shift(
            hidden, self.token_targets(input_ids, uniforms), self.anchors[input_ids],
            pool_weights(self._pool, attention_mask, hidden.dtype), active,
            radius=self.radius, steps=self.pgd_steps, lam=self.lam, mu=self.mu,
        )

    def perturb(self, hidden, input_ids, attention_mask):
        spans = real_spans(attention_mask)
        streams = self.streams(input_ids, attention_mask, spans)
        uniforms = None
        if self.use_shift and self.target_mode != "centroid":  # drawn first: a fixed order per stream
            lengths = attention_mask.bool().sum(1).tolist()
            uniforms = self.scatter([st.uniform((n,)) for st, n in zip(streams, lengths)], attention_mask)
        gaussian, scale = sample_dchi_keyed(streams, attention_mask, hidden.shape[-1], self.epsilon, spans)
        scale = scale.to(hidden.device).mul_(self.noise_scale(input_ids))  # s_i: importance levels
        base = hidden + self.mean_shift(hidden, input_ids, attention_mask, uniforms) if self.use_shift else hidden
        return torch.addcmul(base, gaussian.to(hidden.device), scale.unsqueeze(-1))


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


class _LabelDefense(Defense):
    """What the two label defences share: special tokens are released as public constants, the
    mean of each one's representations in the device's fit (a special the fit never saw: the
    fit's centre), whatever the text.

    Both map every token through matrix products, and a float32 product may round differently
    with the batch's shape (the BLAS picks its kernel by size; measured on an AVX-512 machine:
    2.7e-7 between a sentence's features alone and in a batch of three). Release once promises
    that a sentence is released identically alone or in any batch, so their maps run in float64,
    whose rounding differences (about 1e-16) vanish when the release is cast back."""

    def _check_fitted(self, split: SplitModel, option: str, fitted, kind: type, rank) -> None:
        """``fitted`` (the ``option`` the device fitted) is a ``kind`` of the split's size and of rank
        ``rank``; sets ``subspace_rank``."""
        self.subspace_rank = _number("subspace_rank", rank, 1, split.hidden_size, low_open=False, integer=True)
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        if fitted is None:
            raise ValueError(f"defense={self.name!r} needs {option}=<{article} {kind.__name__} fitted on the device's own "
                             "data>; build it with privtune_flwr.device.device_defense(...)")
        if not isinstance(fitted, kind):
            raise ValueError(f"{option} must be {article} {kind.__name__}, got {type(fitted).__name__}")
        fitted.check(split.hidden_size)
        if fitted.rank != self.subspace_rank:
            raise ValueError(f"the {option} has rank {fitted.rank} but subspace_rank={self.subspace_rank}")

    def _register_specials(self, split: SplitModel, fitted) -> None:
        self.register_buffer("special_ids", split.special_ids, persistent=False)
        table = self.center.unsqueeze(0).repeat(len(split.special_ids), 1)  # one row per special id
        for sid, row in zip(fitted.special_ids.tolist(), fitted.special):
            hit = (split.special_ids == sid).nonzero()
            if len(hit):
                table[int(hit[0])] = row.float()
        self.register_buffer("special_values", table, persistent=False)

    def _with_specials(self, released: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        special = torch.isin(input_ids, self.special_ids)
        if special.any():
            released[special] = self.special_values[torch.searchsorted(self.special_ids, input_ids[special])]
        return released


class LabelSubspaceDefense(_LabelDefense):
    """Release each token's projection onto a label subspace fitted on the device, plus d_chi noise in it.

    ``released_i = c + U (U^T (h_i - c) + z_i)`` for every regular token, where ``U`` ``[d, k]`` is
    the orthonormal basis and ``c`` the centre of a :class:`~privtune_flwr.mechanism.subspace.Subspace`
    that the device fitted once on its own labelled data (:func:`privtune_flwr.device.device_defense`)
    and keeps fixed, and ``z_i`` is d_chi noise of dimension ``k`` at ``epsilon``. Special tokens are
    released as the subspace's public constants. The top receives ``R^d`` as for every defence.

    Why: the top needs the sentence label, an inverter each token's identity; a release that keeps
    only ``k`` label-predicting directions per token loses identity within every group of tokens of
    equal label relevance. What it guarantees: :meth:`statement`.
    """

    name = "label-subspace"

    def __init__(self, split: SplitModel, epsilon: float, *, key=None, seed=None, release="once",
                 subspace: Subspace | None = None, subspace_rank: int = LabelSubspaceOptions.subspace_rank):
        super().__init__(split, epsilon, key=key, seed=seed, release=release)
        self._check_fitted(split, "subspace", subspace, Subspace, subspace_rank)
        self.register_buffer("center", subspace.center.float().clone(), persistent=False)
        self.register_buffer("basis", subspace.basis.float().clone(), persistent=False)
        # the float64 copies the map runs on (see _LabelDefense), made once rather than per call
        self.register_buffer("center64", self.center.double(), persistent=False)
        self.register_buffer("basis64", self.basis.double(), persistent=False)
        self._register_specials(split, subspace)
        self.reader_accuracy = float(subspace.reader_accuracy)

    def mechanism_config(self) -> dict:
        digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes()
                                         for t in (self.center, self.basis, self.special_values))).hexdigest()
        return {**super().mechanism_config(), "subspace": digest, "rank": self.subspace_rank}

    def perturb(self, hidden, input_ids, attention_mask):
        spans = real_spans(attention_mask)
        streams = self.streams(input_ids, attention_mask, spans)
        gaussian, scale = sample_dchi_keyed(streams, attention_mask, self.subspace_rank, self.epsilon, spans)
        center, basis = self.center64, self.basis64
        coords = (hidden.double() - center) @ basis  # float64: see _LabelDefense
        coords = torch.addcmul(coords, gaussian.to(hidden.device).double(), scale.to(hidden.device).double().unsqueeze(-1))
        released = (center + coords @ basis.T).to(hidden.dtype)
        return self._with_specials(released, input_ids)


class LabelObfuscatorDefense(_LabelDefense):
    """Release ``k`` learned label features per token, plus d_chi noise on them.

    ``released_i = c + L (u(h_i) + z_i)`` for every regular token, where ``u`` is the network of an
    :class:`~privtune_flwr.mechanism.obfuscator.Obfuscator` the device fitted once on its own
    labelled data (:func:`privtune_flwr.device.device_defense`): trained to keep the sentence label
    while a token inverter trained beside it is left uncertain. ``L`` ``[d, k]`` is the public
    orthonormal lift, ``c`` the obfuscator's centre and ``z_i`` d_chi noise of dimension ``k`` at
    ``epsilon``. Special tokens are released as public constants. The top receives ``R^d``.

    Why: ``label-subspace`` keeps linear directions; a network can keep more of the label in the
    same ``k`` numbers and less of the token's identity. What it guarantees: :meth:`statement`.
    """

    name = "label-obfuscator"

    def __init__(self, split: SplitModel, epsilon: float, *, key=None, seed=None, release="once",
                 obfuscator: Obfuscator | None = None, subspace_rank: int = LabelObfuscatorOptions.subspace_rank):
        super().__init__(split, epsilon, key=key, seed=seed, release=release)
        self._check_fitted(split, "obfuscator", obfuscator, Obfuscator, subspace_rank)
        self.scale = float(obfuscator.scale)
        self.register_buffer("center", obfuscator.center.float().clone(), persistent=False)
        self.register_buffer("lift", obfuscator.lift.float().clone(), persistent=False)
        for name in obfuscator.weights:
            self.register_buffer("net_" + name.replace(".", "_"), obfuscator.weights[name].float().clone(), persistent=False)
        # the float64 copies the map runs on (see _LabelDefense), made once rather than per call
        self.register_buffer("center64", self.center.double(), persistent=False)
        self.register_buffer("lift64", self.lift.double(), persistent=False)
        for name, weight in self._weights().items():
            self.register_buffer("net64_" + name.replace(".", "_"), weight.double(), persistent=False)
        self._register_specials(split, obfuscator)
        self.reader_accuracy = float(obfuscator.reader_accuracy)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{p}": getattr(self, f"net_{i}_{p}") for i in LAYERS for p in ("weight", "bias")}

    def mechanism_config(self) -> dict:
        tensors = (self.center, self.lift, self.special_values, *self._weights().values())
        digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)).hexdigest()
        return {**super().mechanism_config(), "obfuscator": digest, "scale": self.scale, "rank": self.subspace_rank}

    def perturb(self, hidden, input_ids, attention_mask):
        spans = real_spans(attention_mask)
        streams = self.streams(input_ids, attention_mask, spans)
        gaussian, scale = sample_dchi_keyed(streams, attention_mask, self.subspace_rank, self.epsilon, spans)
        center = self.center64
        weights = {f"{i}.{p}": getattr(self, f"net64_{i}_{p}") for i in LAYERS for p in ("weight", "bias")}
        coords = feature_map(hidden.double(), center, self.scale, weights)  # float64: see _LabelDefense
        coords = torch.addcmul(coords, gaussian.to(hidden.device).double(), scale.to(hidden.device).double().unsqueeze(-1))
        released = (center + coords @ self.lift64.T).to(hidden.dtype)
        return self._with_specials(released, input_ids)


DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        NoDefense, DChiDefense, GaussianDefense, PrivTuneDefense, PrivTuneNoImportance,
        PrivTuneNoMean, PrivTuneRandomTarget, PrivTuneSampledTarget, LabelSubspaceDefense, LabelObfuscatorDefense,
    )
}

if set(DEFENSES) != set(registry.DEFENSES):  # every registered name has a class, and no class lacks an entry
    raise ImportError(f"defences and registry disagree: {sorted(set(DEFENSES) ^ set(registry.DEFENSES))}")
# What a device fitted and hands to its defence, beside the registry's options.
FITTED_INPUTS = ("importance", "subspace", "obfuscator")


def build_defense(name: str, *, epsilon: float | None = None, split: SplitModel, key: NoiseKey | None = None,
                  seed: int | str | None = None, release: str = "once", **options) -> Defense:
    """Create the defence ``name`` for ``split`` at privacy parameter ``epsilon``.

    Noise: with neither ``key`` nor ``seed`` the defence draws a fresh key from OS entropy, so its
    noise is unpredictable to anyone else; ``key`` is a device's :class:`NoiseKey`; ``seed`` makes
    the noise reproducible by whoever knows it (research only; the statement says so).
    ``options`` are the registry's options of any defence (:mod:`privtune_flwr.registry`) and the
    fitted inputs ``importance``/``subspace``/``obfuscator``; those a defence does not use are
    ignored, unknown names raise. ``none`` ignores ``epsilon``.
    """
    if name not in DEFENSES:
        raise ValueError(f"defense={name!r} is unknown; accepted: {', '.join(DEFENSES)}")
    accepted_names = (*registry.all_option_names(), *FITTED_INPUTS)
    unknown = sorted(set(options) - set(accepted_names))
    if unknown:
        raise ValueError(f"unknown defence option(s) {unknown}; accepted: {', '.join(accepted_names)}")
    cls = DEFENSES[name]
    common = {"key": key, "seed": seed, "release": release}
    if cls is NoDefense:
        return cls(split, None, **common)  # epsilon has no meaning without noise
    if epsilon is None:
        raise ValueError(f"defense={name!r} needs epsilon; accepted: a finite value > 0")
    check_epsilon(epsilon)
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(split, epsilon, **common, **{k: v for k, v in options.items() if k in accepted})
