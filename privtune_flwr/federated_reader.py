"""The reader rounds of the federation's label map: the reader fit, trained by the devices together
with per-sentence differential privacy.

Why: the closed-form map from the summed statistics (:mod:`privtune_flwr.federated_map`) keeps
less of the label than the reader fit does on the same data (cached split-3 Rotten Tomatoes, the
real top trained 800 steps on the releases: 0.746 against 0.793, docs/results.md "One label map
for the federation"). The reader fit needs gradients, not sums, so after the statistics the cloud
runs ``defense.label-subspace.fit-rounds`` rounds (message action ``query.reader``):

1. the cloud sends the current weights (at first :func:`initial_weights`): the projection ``W``
   ``[d, k]`` and the small reader's parameters (:func:`reader_shapes`; the architecture is
   public), with the centre and spread it computed from the summed statistics, to at most
   ``defense.label-subspace.fit-devices`` devices, drawn afresh each round;
2. each device takes ``defense.label-subspace.fit-steps`` full-batch steps on its own training sentences: each
   sentence's gradient clipped to ``defense.label-subspace.fit-grad-clip``, their sum plus Gaussian noise of sd
   ``multiplier * clip`` (fresh OS entropy), then an Adam step; it returns the change of the
   weights;
3. the cloud checks each change against the largest change those steps can make (:func:`step_bound`)
   and applies the mean of the valid ones.

Privacy, per sentence of a device (add or remove one): every noisy sum is a Gaussian mechanism of
sensitivity ``clip``, whatever weights the cloud sends; the change is post-processing. In Gaussian
differential privacy (Dong, Roth and Su, 2022) ``T`` such steps of multiplier ``s`` compose
exactly to ``sqrt(T)/s``-GDP, and the statistics' noise is one more Gaussian mechanism. A device
splits its floor ``(fit-epsilon, fit-delta)``, as ``mu = 1 / gaussian_sigma(eps, delta)``,
evenly in ``mu^2`` between the statistics and the reader steps (:func:`split_budget`), for the
``T = rounds x steps`` of the run it committed to at its first step, and refuses any step past
``T``. A cloud that declares more steps gets noisier steps, never a weaker guarantee.

The basis itself is derived by each device from the final ``W`` and the summed statistics, in the
statistics' frame, and audited on its own data before use (``query.map``): the cloud relays ``W``,
and a ``W`` chosen to help an inverter fails that audit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn import functional as F

from .mechanism.gaussian import analytic_gaussian_sigma
from .mechanism.noise_key import NoiseKey
from .mechanism.subspace import _Reader, _pad

READER_ACTION = "reader"  # message type "query.reader": the weights go out, each device's change comes back
WEIGHTS = "basis-weights"  # the projection W [d, k] in the reader's weights and in query.map
READER_WIDTH = 64
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
STATS_SHARE = 0.5  # the statistics' share of a device's fit budget in mu^2; the reader steps get the rest
_READER_NOISE = b"privtune-flwr/reader-noise/v1"


@dataclass(frozen=True)
class ReaderPlan:
    """The run's public plan for the reader rounds (run config keys ``subspace-fit-*``)."""

    rounds: int
    steps: int
    lr: float
    clip: float
    rank: int
    classes: int
    max_len: int
    optimizer: str = "device"  # FIT_OPTIMIZERS: who takes the Adam steps

    @classmethod
    def from_config(cls, cfg) -> "ReaderPlan":
        return cls(int(cfg.subspace_fit_rounds), int(cfg.subspace_fit_steps), float(cfg.subspace_fit_lr),
                   float(cfg.subspace_fit_grad_clip), int(cfg.subspace_rank), int(cfg.num_labels), int(cfg.max_length),
                   str(getattr(cfg, "subspace_fit_optimizer", "device")))

    @property
    def steps_per_round(self) -> int:
        """The noisy gradient sums a device releases in one round: ``steps`` when it takes the Adam
        steps itself, one when the cloud does."""
        return self.steps if self.optimizer == "device" else 1

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def reader(self) -> nn.Module:
        """The reader these weights belong to, without dropout (its gradients are per sentence)."""
        module = _Reader(self.rank, self.classes, READER_WIDTH, self.max_len)
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        module.layer.self_attn.dropout = 0.0
        return module


def reader_shapes(plan: ReaderPlan, hidden: int) -> dict[str, tuple[int, ...]]:
    """Every weight of the reader rounds, by name: ``W`` and the reader's parameters."""
    shapes = {WEIGHTS: (hidden, plan.rank)}
    shapes.update({k: tuple(v.shape) for k, v in plan.reader().named_parameters()})
    return shapes


def initial_weights(plan: ReaderPlan, hidden: int, seed: int) -> dict[str, np.ndarray]:
    """The cloud's starting point, from ``seed``: a random ``W`` (Gaussian, sd ``1/sqrt(d)``) and a
    freshly initialised reader, as the one-device reader fit starts. A start at the closed-form basis
    was measured and left: its second direction (the tokens' principal one) stays near where it
    starts, and the map let more through (docs/results.md, "One map for the federation")."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reader = plan.reader()
    out = {WEIGHTS: (torch.randn(hidden, plan.rank, generator=generator) / math.sqrt(hidden)).numpy()}
    out.update({k: v.detach().float().contiguous().numpy().copy() for k, v in reader.named_parameters()})
    return out


def check_weights(arrays: dict, shapes: dict[str, tuple[int, ...]], what: str = "reader weights") -> dict[str, torch.Tensor]:
    """Weights that arrived in a message: exactly the names and shapes of ``shapes``, finite.
    Raises ValueError naming the array and the accepted shape."""
    names = sorted(arrays)
    if names != sorted(shapes):
        raise ValueError(f"the {what} hold arrays {names}; accepted: exactly {sorted(shapes)}")
    out = {}
    for name, shape in shapes.items():
        value = arrays[name]
        value = torch.as_tensor(np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float32))
        if tuple(value.shape) != shape:
            raise ValueError(f"{what}: array {name!r} has shape {tuple(value.shape)}; accepted: {shape}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{what}: array {name!r} holds non-finite values; accepted: finite values only")
        out[name] = value.clone()
    return out


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest sd of Gaussian noise that makes a query of L2 sensitivity 1 (epsilon,
    delta)-DP: the analytic Gaussian mechanism (``mechanism.gaussian``), valid for every
    epsilon > 0. Errors name the fit phase's keys."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"fit-epsilon={epsilon!r} is outside the accepted range (0, inf)")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"fit-delta={delta!r} is outside the accepted range (0, 1)")
    return analytic_gaussian_sigma(float(epsilon), float(delta), 1.0)


def split_budget(fit_epsilon: float, fit_delta: float, plan: ReaderPlan) -> tuple[float, float]:
    """``(sd of the statistics' noise per unit sensitivity, noise multiplier of one reader step)``
    for a device whose floor is ``(fit_epsilon, fit_delta)``: ``mu^2`` is shared evenly between the
    statistics (``STATS_SHARE``) and the ``T`` reader steps (all of it to the statistics when ``T = 0``)."""
    sigma = gaussian_sigma(fit_epsilon, fit_delta)  # = 1 / mu for the whole fit phase
    if plan.total_steps == 0:
        return sigma, math.inf
    return sigma / math.sqrt(STATS_SHARE), sigma * math.sqrt(plan.total_steps / (1 - STATS_SHARE))


def composed_mu(stats_sigma: float, step_multiplier: float, steps: int) -> float:
    """The GDP ``mu`` of the statistics (sd ``stats_sigma`` per unit sensitivity) and ``steps``
    reader steps of ``step_multiplier``: ``sqrt(1/sigma^2 + steps / multiplier^2)``."""
    return math.sqrt(stats_sigma ** -2 + (0.0 if math.isinf(step_multiplier) else steps / step_multiplier ** 2))


def step_bound(plan: ReaderPlan) -> float:
    """The largest change of any one weight that ``plan.steps`` steps of this Adam can make, for
    any gradients: step ``t`` moves a weight by ``lr |m_t| / (1 - b1^t) / (sqrt(v_t / (1 - b2^t))
    + eps)``, and Cauchy-Schwarz gives ``|m_t| <= (1 - b1) sqrt(sum_j (b1^2/b2)^j) sqrt(v_t /
    (1 - b2))`` over the ``t`` terms. An honest change never exceeds the sum over the steps."""
    b1, b2 = BETAS
    total = 0.0
    for t in range(1, plan.steps + 1):
        geometric = sum((b1 * b1 / b2) ** j for j in range(t))
        total += (1 - b1) / (1 - b1 ** t) * math.sqrt(geometric) * math.sqrt(1 - b2 ** t) / math.sqrt(1 - b2)
    return plan.lr * total


def reader_logits(p: dict[str, torch.Tensor], f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reader of :meth:`ReaderPlan.reader` (eval mode) on one sentence, written out from its
    weights ``p`` (its parameter names): projected tokens ``f`` ``[T, k]``, ``mask`` ``[T]`` ->
    logits ``[C]``. Plain tensor arithmetic, so that ``vmap`` batches it (PyTorch has no batching
    rule for its fused attention)."""
    a = "layer.self_attn."
    width = p["inp.bias"].shape[0]
    heads = 4
    x = f @ p["inp.weight"].T + p["inp.bias"] + p["pos.weight"][: f.shape[0]]
    q, k, v = (x @ p[a + "in_proj_weight"].T + p[a + "in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(-1, heads, width // heads).transpose(0, 1) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // heads)
    scores = scores.masked_fill(mask[None, None, :] == 0, float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(-1, width)
    x = F.layer_norm(x + attended @ p[a + "out_proj.weight"].T + p[a + "out_proj.bias"], (width,),
                     p["layer.norm1.weight"], p["layer.norm1.bias"], 1e-5)
    ff = F.relu(x @ p["layer.linear1.weight"].T + p["layer.linear1.bias"]) @ p["layer.linear2.weight"].T
    x = F.layer_norm(x + ff + p["layer.linear2.bias"], (width,), p["layer.norm2.weight"], p["layer.norm2.bias"], 1e-5)
    m = mask.unsqueeze(-1).to(x.dtype)
    pooled = (x * m).sum(0) / m.sum().clamp_min(1.0)
    return pooled @ p["out.weight"].T + p["out.bias"]


def clipped_gradient_sum(weights: dict[str, torch.Tensor], rows, ids, labels, *, center: torch.Tensor, scale: float,
                         special_ids, plan: ReaderPlan, chunk: int = 128) -> tuple[dict[str, torch.Tensor], float]:
    """The sum over the sentences of each one's loss gradient at ``weights``, each clipped to norm
    ``plan.clip`` (over all weights together): adding or removing one sentence moves it by at most
    ``plan.clip``. Also returns the share of sentences that were clipped."""
    names = list(weights)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    special_ids = torch.as_tensor(special_ids, dtype=torch.long)

    def loss_one(p, h, regular, mask, y):
        basis, _ = torch.linalg.qr(p[WEIGHTS])
        f = ((h - center) @ basis) * regular.unsqueeze(-1) / scale
        return F.cross_entropy(reader_logits(p, f, mask)[None], y[None])

    per_sentence = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))
    total = {k: torch.zeros_like(v) for k, v in weights.items()}
    clipped = 0
    for s in range(0, len(rows), chunk):
        b = list(range(s, min(s + chunk, len(rows))))
        hidden, tokens, mask = _pad([rows[i][:plan.max_len] for i in b], [ids[i][:plan.max_len] for i in b])
        regular = (mask.bool() & ~torch.isin(tokens, special_ids)).float()
        g = per_sentence(weights, hidden, regular, mask, labels[b])
        norms = torch.sqrt(sum((g[k].flatten(1) ** 2).sum(1) for k in names))
        factor = (plan.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        clipped += int((factor < 1).sum())
        for k in names:
            total[k] += (g[k] * factor.view(-1, *[1] * (g[k].dim() - 1))).sum(0)
    return total, clipped / max(1, len(rows))


def add_gaussian(total: dict[str, torch.Tensor], sd: float, draw) -> dict[str, torch.Tensor]:
    """``total`` plus independent Gaussian noise of sd ``sd`` on every entry; ``draw(shape)`` gives
    standard normals."""
    return {k: v + draw(tuple(v.shape)) * sd for k, v in total.items()}


def adam_step(weights, m1, m2, gradient, t: int, lr: float):
    """One Adam step (``BETAS``, ``ADAM_EPS``, bias-corrected) of every weight; returns the new
    ``(weights, m1, m2)``. Each weight moves by at most the step-``t`` term of :func:`step_bound`."""
    b1, b2 = BETAS
    m1 = {k: b1 * m1[k] + (1 - b1) * gradient[k] for k in weights}
    m2 = {k: b2 * m2[k] + (1 - b2) * gradient[k] * gradient[k] for k in weights}
    new = {k: weights[k] - lr * (m1[k] / (1 - b1 ** t)) / (torch.sqrt(m2[k] / (1 - b2 ** t)) + ADAM_EPS) for k in weights}
    return new, m1, m2


def private_steps(weights: dict[str, torch.Tensor], rows, ids, labels, *, center: torch.Tensor, scale: float,
                  special_ids, plan: ReaderPlan, multiplier: float, generator: torch.Generator | None = None,
                  chunk: int = 128) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One device's round: ``plan.steps`` full-batch Adam steps from ``weights`` on its sentences
    (``rows[i]`` ``[n_i, d]``, ``ids[i]``, ``labels[i]``): each step the clipped gradient sum
    (:func:`clipped_gradient_sum`) plus Gaussian noise of sd ``multiplier * plan.clip``. Returns
    the change of every weight and public numbers. The noise is drawn from a fresh key of OS
    entropy (``generator``: a seeded stand-in for tests). ``center``, ``scale``: the frame the
    cloud sent (the guarantee holds whatever they are)."""
    start = time.perf_counter()
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the reader's scale={scale!r} is outside the accepted range (0, inf)")
    center = center.float()
    local = {k: v.clone().float() for k, v in weights.items()}
    m1 = {k: torch.zeros_like(v) for k, v in local.items()}
    m2 = {k: torch.zeros_like(v) for k, v in local.items()}
    draw = _standard_normals(generator)
    shares = []
    for t in range(1, plan.steps + 1):
        total, share = clipped_gradient_sum(local, rows, ids, labels, center=center, scale=scale,
                                            special_ids=special_ids, plan=plan, chunk=chunk)
        shares.append(share)
        local, m1, m2 = adam_step(local, m1, m2, add_gaussian(total, multiplier * plan.clip, draw), t, plan.lr)
    change = {k: (local[k] - weights[k].float()).contiguous() for k in weights}
    metrics = {"reader-steps": float(plan.steps), "reader-noise-multiplier": float(multiplier),
               "reader-clipped-share": float(np.mean(shares)), "reader-seconds": time.perf_counter() - start}
    return change, metrics


def private_gradient(weights: dict[str, torch.Tensor], rows, ids, labels, *, center: torch.Tensor, scale: float,
                     special_ids, plan: ReaderPlan, multiplier: float, generator: torch.Generator | None = None,
                     chunk: int = 128) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One device's round when the cloud takes the steps (``fit-optimizer = "cloud"``): the clipped
    gradient sum at ``weights`` over its sentences plus Gaussian noise of sd ``multiplier *
    plan.clip`` (fresh OS entropy; ``generator`` a seeded stand-in for tests), once. The same
    Gaussian mechanism as one step of :func:`private_steps`; the cloud adds the devices' sums."""
    start = time.perf_counter()
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the reader's scale={scale!r} is outside the accepted range (0, inf)")
    local = {k: v.clone().float() for k, v in weights.items()}
    total, share = clipped_gradient_sum(local, rows, ids, labels, center=center.float(), scale=scale,
                                        special_ids=special_ids, plan=plan, chunk=chunk)
    draw = _standard_normals(generator)
    noisy = {k: v.contiguous() for k, v in add_gaussian(total, multiplier * plan.clip, draw).items()}
    metrics = {"reader-steps": 1.0, "reader-noise-multiplier": float(multiplier), "reader-clipped-share": float(share),
               "reader-seconds": time.perf_counter() - start}
    return noisy, metrics


def reader_record(plan: ReaderPlan) -> str:
    """The name of the ArrayRecord a device's ``query.reader`` reply carries: ``"change"`` (its
    Adam steps' change) or ``"gradient"`` (one noisy gradient sum, ``fit-optimizer = "cloud"``)."""
    return "change" if plan.optimizer == "device" else "gradient"


NORM_CAP = 3.0  # the cloud scales a device's gradient sum down to NORM_CAP x the round's median norm
COORD_CAP = 6.0  # then keeps each coordinate within COORD_CAP x the median device's spread of the per-coordinate median


def summed_gradient(gradients, shapes: dict[str, tuple[int, ...]]):
    """The sum of the valid ``(name, arrays)`` noisy gradient sums, each first scaled down to at
    most ``NORM_CAP`` times the median norm of the valid ones this round, then each coordinate
    clamped to within ``COORD_CAP`` times the median device's root-mean-square distance from the
    coordinate-wise median of the devices. So no device weighs more than ``NORM_CAP`` typical
    devices in all, nor, by putting its norm into a few coordinates, more than ``COORD_CAP``
    sd of one device's noise in any one of them (the cloud's Adam normalises per coordinate). The
    signal that honest devices share sits in the median, so their sums, whose spread about it is
    mostly their Gaussian noise, are left alone but for a coordinate beyond 6 sd (about 2e-9 of
    them). Returns ``(sum or None, accepted names, rejected [(name, reason)], names scaled down
    or clamped)``. Wrong names or shapes and non-finite values are left out."""
    valid, rejected = [], []
    for name, arrays in gradients:
        try:
            valid.append((name, check_weights(arrays, shapes, "reader gradient")))
        except (ValueError, TypeError) as exc:
            rejected.append((name, str(exc)))
    if not valid:
        return None, [], rejected, []
    size = max(1, sum(math.prod(v) for v in shapes.values()))
    norms = [float(torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))) for _, g in valid]
    cap = NORM_CAP * float(np.median(norms))
    scaled, kept = [], []
    for (name, g), norm in zip(valid, norms):
        if norm > cap:
            scaled.append(name)
            g = {k: v * (cap / norm) for k, v in g.items()}
        kept.append(g)
    stacked = {k: torch.stack([g[k].float() for g in kept]) for k in shapes}
    centre = {k: v.median(dim=0).values for k, v in stacked.items()}
    spread = torch.sqrt(sum(((v - centre[k]) ** 2).flatten(1).sum(1) for k, v in stacked.items()) / size)
    bound = COORD_CAP * float(spread.median())
    clamped = {k: torch.maximum(torch.minimum(v, centre[k] + bound), centre[k] - bound) for k, v in stacked.items()}
    for i, (name, _) in enumerate(valid):
        if name not in scaled and any(not torch.equal(clamped[k][i], stacked[k][i]) for k in shapes):
            scaled.append(name)
    total = {k: v.sum(0) for k, v in clamped.items()}
    return total, [n for n, _ in valid], rejected, [n for n, _ in valid if n in scaled]


class CloudAdam:
    """The cloud's Adam over the reader rounds (``fit-optimizer = "cloud"``): one step per round on
    the summed noisy gradients. Adam is invariant to the gradient's scale, so the sum needs no
    count of the sentences behind it; the steps are post-processing of the devices' releases."""

    def __init__(self, weights: dict[str, torch.Tensor], lr: float):
        self.lr, self.t = float(lr), 0
        self.m1 = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in weights.items()}
        self.m2 = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in weights.items()}

    def step(self, weights: dict[str, torch.Tensor], gradient: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.t += 1
        new, self.m1, self.m2 = adam_step({k: v.float() for k, v in weights.items()}, self.m1, self.m2,
                                          {k: v.float() for k, v in gradient.items()}, self.t, self.lr)
        return new


def _standard_normals(generator: torch.Generator | None):
    """``draw(shape)``: standard normals from a fresh OS-entropy key, or from ``generator`` (tests)."""
    if generator is None:
        stream = NoiseKey.fresh().stream(_READER_NOISE, [])
        return lambda shape: torch.from_numpy(stream.numpy.standard_normal(shape)).float()
    return lambda shape: torch.randn(shape, generator=generator)


def mean_change(changes, shapes: dict[str, tuple[int, ...]], bound: float):
    """The mean of the valid ``(name, arrays)`` changes; returns ``(mean or None, accepted names,
    rejected [(name, reason)])``. A change with the wrong names or shapes, non-finite values or a
    weight moved further than ``bound`` (more than those steps can honestly move it) is left out."""
    total, accepted, rejected = None, [], []
    for name, arrays in changes:
        try:
            change = check_weights(arrays, shapes, "reader change")
            largest = max(float(v.abs().max()) for v in change.values())
            if largest > bound * (1 + 1e-5):
                raise ValueError(f"the reader change moves a weight by {largest:.4g}; accepted: at most {bound:.4g} "
                                 "(the most subspace-fit-steps Adam steps of subspace-fit-lr can)")
        except (ValueError, TypeError) as exc:
            rejected.append((name, str(exc)))
            continue
        total = change if total is None else {k: total[k] + change[k] for k in total}
        accepted.append(name)
    if total is not None:
        total = {k: v / len(accepted) for k, v in total.items()}
    return total, accepted, rejected


def frame_of(stats) -> tuple[torch.Tensor, float]:
    """The centre ``[d]`` and the mean spread per dimension of the regular tokens, from the summed
    statistics (what the reader's inputs are normalised by)."""
    counts = stats.counts.clamp_min(0)
    n = float(counts.sum())
    if n < 1:
        raise ValueError(f"the federation's statistics hold {n:.1f} regular tokens; the reader needs at least 1")
    center = stats.sums.sum(0) / n
    variance = (torch.diagonal(stats.second) / n - center ** 2).clamp_min(0)
    return center.float(), float(variance.sqrt().mean())
