"""One label map for the whole federation: a federated closed-form fit of ``label-subspace``.

Why: a device that fits its map on its own share (a few hundred sentences, perhaps one class)
fits a poor map or none at all (docs/results.md, "Label maps in a federation"). The closed-form
fit (:func:`~privtune_flwr.mechanism.subspace.closed_form_basis`) needs only sums over tokens, so
the devices can fit one map together before round 1:

1. each device computes :class:`MapStatistics` on its own training tokens (each token clipped to
   the norm ``clip``): per class the count and the sum of its regular tokens, the sum of all their
   outer products, and per special id a count and a sum;
2. it adds Gaussian noise calibrated to its own floor (``fit-epsilon``, ``fit-delta`` of
   :mod:`~privtune_flwr.device_policy`) for one sentence of at most ``model.max-length`` tokens, and
   sends the noisy statistics (message action ``query.fit``);
3. the cloud sums the valid contributions and sends the sum to every device (``query.map``);
4. each device checks the sum, derives the map itself (:func:`derive_subspace`, the same arithmetic
   as the closed-form fit on the union of the data), audits it on its own data
   (:func:`audit_map`: an inverter trained through the map, the label read back) and uses it, or
   refuses it.

Why not Flower's secure aggregation. In flwr 1.42 ``SecAggPlusWorkflow`` is a workflow of the
legacy ``flwr.server`` path: it runs inside ``DefaultWorkflow`` beside a legacy ``Strategy``, wraps
only the ``"train"`` (fit) round of that workflow, and its client half ``secaggplus_mod`` masks only
the ``"fitres.parameters"`` ArrayRecord of a plain ``"train"`` reply, after clipping every value to
``clipping_range`` and quantising it to ``quantization_range`` levels, with modular sums over
``modulus_range``. This app's strategy is a Message-API ``flwr.serverapp.strategy.Strategy`` whose
``start()`` drives its own protocol through the ``Grid``; here ``"train"`` messages are the
releases (the mod would try to mask them, and the workflow owns the rounds it sends), and a
statistics message is a ``query`` action, which the mod passes through unmasked. Carrying d x d
second moments would also need a clipping range that fits sums over thousands of tokens (values up
to ``tokens x clip**2``) quantised finely enough for an eigen-decomposition, four rounds of key
agreement per fit, and at least ``num-shares`` honest devices online. So the statistics here carry
their own (epsilon, delta) guarantee instead: whatever the cloud does with one device's
contribution, it is differentially private for that device's sentences.

The cloud never sends a basis, only the sum; a device joining later gets the same sum (it does not
refit). Every array of the sum is checked before use (shapes, finiteness, symmetry, positive
counts) and a device's randomness for its noise comes from OS entropy (``secrets``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .mechanism.noise_key import NoiseKey
from .mechanism.subspace import Subspace, basis_from_moments
from .federated_reader import gaussian_sigma

log = logging.getLogger(__name__)
cloud_log = logging.getLogger("privtune_flwr.cloud")  # the cloud's console lines

FIT_ACTION = "fit"  # message type "query.fit": a device's noisy statistics
MAP_ACTION = "map"  # message type "query.map": the federation's sum, for the device to derive and audit
ARRAYS = ("counts", "sums", "second", "special-counts", "special-sums")
BLOCKS = 3  # noise blocks calibrated jointly: counts, sums, second moments
GROUP = 64  # the cloud sends large fit-phase messages to this many devices at a time


@dataclass
class MapStatistics:
    """Sufficient statistics of the closed-form label fit, summed over (clipped) regular tokens.

    ``counts`` ``[C]``: regular tokens per class; ``sums`` ``[C, d]``: their sums; ``second``
    ``[d, d]``: the sum of ``x x^T`` over all regular tokens; ``special_counts`` ``[S]`` and
    ``special_sums`` ``[S, d]``: the same per special id, in the model's ``special_ids`` order.
    All float64. Sums of statistics are the statistics of the union of the data."""

    counts: torch.Tensor
    sums: torch.Tensor
    second: torch.Tensor
    special_counts: torch.Tensor
    special_sums: torch.Tensor

    def __add__(self, other: "MapStatistics") -> "MapStatistics":
        return MapStatistics(*(a + b for a, b in zip(self.arrays(), other.arrays())))

    def arrays(self) -> tuple[torch.Tensor, ...]:
        return self.counts, self.sums, self.second, self.special_counts, self.special_sums

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * 8 for a in self.arrays())

    def to_numpy(self) -> dict:
        return {name: a.double().contiguous().numpy() for name, a in zip(ARRAYS, self.arrays())}

    def digest(self) -> str:
        return hashlib.sha256(b"".join(a.double().contiguous().numpy().tobytes() for a in self.arrays())).hexdigest()

    @classmethod
    def from_arrays(cls, arrays, *, classes: int, hidden: int, specials: int) -> "MapStatistics":
        """Read (and check) statistics that arrived in a message: the exact names, shapes
        ``[C] [C, d] [d, d] [S] [S, d]``, finite values, a symmetric ``second``. Raises ValueError
        naming the array and the accepted shape or range."""
        names = sorted(arrays.keys())
        if names != sorted(ARRAYS):
            raise ValueError(f"map statistics hold arrays {names}; accepted: exactly {sorted(ARRAYS)}")
        shapes = {"counts": (classes,), "sums": (classes, hidden), "second": (hidden, hidden),
                  "special-counts": (specials,), "special-sums": (specials, hidden)}
        out = []
        for name in ARRAYS:
            value = arrays[name]
            value = torch.as_tensor(value.numpy() if hasattr(value, "numpy") else value).double()
            if tuple(value.shape) != shapes[name]:
                raise ValueError(f"map statistics {name!r} has shape {tuple(value.shape)}; accepted: {shapes[name]}")
            if not torch.isfinite(value).all():
                raise ValueError(f"map statistics {name!r} holds {int((~torch.isfinite(value)).sum())} non-finite "
                                 "values; accepted: finite values only")
            out.append(value.clone())
        second = out[2]
        asym = float((second - second.T).abs().max()) if hidden else 0.0
        if asym > 1e-6 * max(1.0, float(second.abs().max())):
            raise ValueError(f"map statistics 'second' is not symmetric (largest |S - S^T| = {asym:.3g}); accepted: "
                             "a symmetric matrix")
        return cls(*out)


def clipped(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row of ``x`` scaled down to norm at most ``clip`` (``clip <= 0``: unchanged)."""
    if clip <= 0:
        return x
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)


def token_statistics(rows, ids, labels, *, num_labels: int, special_ids, clip: float = 0.0) -> MapStatistics:
    """The statistics of a device's sentences (``rows[i]`` ``[n_i, d]``, ``ids[i]``, ``labels[i]``),
    each token clipped to norm ``clip`` first. Any number of classes, one included."""
    if not rows or len(rows) != len(ids) or len(rows) != len(labels):
        raise ValueError(f"token_statistics needs as many rows, ids and labels (got {len(rows)}, {len(ids)}, "
                         f"{len(labels)}), at least one")
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())}; accepted: 0..{num_labels - 1}")
    special_ids = torch.as_tensor(special_ids, dtype=torch.long)
    h = clipped(torch.cat(rows).double(), clip)
    t = torch.cat(ids)
    y = torch.repeat_interleave(labels, torch.tensor([len(r) for r in rows]))
    regular = ~torch.isin(t, special_ids)
    x, yr = h[regular], y[regular]
    d = h.shape[1]
    counts = torch.bincount(yr, minlength=num_labels).double()
    sums = torch.zeros(num_labels, d, dtype=torch.float64).index_add_(0, yr, x)
    position = torch.searchsorted(special_ids, t[~regular]) if len(special_ids) else t[~regular]
    special_counts = torch.bincount(position, minlength=len(special_ids)).double()
    special_sums = torch.zeros(len(special_ids), d, dtype=torch.float64).index_add_(0, position, h[~regular])
    second = x.T @ x  # a BLAS product need not be exactly symmetric: made so (a + b == b + a in IEEE)
    return MapStatistics(counts, sums, (second + second.T) / 2, special_counts, special_sums)


@dataclass(frozen=True)
class FitNoise:
    """The noise one device adds to its statistics: per block, the sensitivity to one sentence of at
    most ``max_tokens`` tokens (each clipped to ``clip``) and the sd that makes the three blocks
    together (``fit_epsilon``, ``fit_delta``)-DP. Add/remove one sentence changes the counts by at
    most ``L`` (L2), the sums by ``L clip`` and the second moments by ``L clip^2`` (Frobenius); each
    block is divided by its sensitivity times sqrt(3), so the joint L2 sensitivity is 1."""

    fit_epsilon: float
    fit_delta: float
    clip: float
    max_tokens: int
    share: float = 1.0  # the statistics' share of the fit phase's budget in mu^2 (the rest: the reader steps)

    def __post_init__(self):
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"defense.label-subspace.fit-clip={self.clip!r} is outside the accepted range (0, inf): the DP "
                             "sensitivity needs a bound on each token's norm")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")

    @property
    def unit_sigma(self) -> float:
        return gaussian_sigma(self.fit_epsilon, self.fit_delta) / math.sqrt(self.share)

    def sigmas(self) -> tuple[float, float, float]:
        """sd of the noise on (counts and special counts, sums and special sums, second moments)."""
        s, L, c = self.unit_sigma * math.sqrt(BLOCKS), float(self.max_tokens), self.clip
        return s * L, s * L * c, s * L * c * c


_FIT_NOISE = b"privtune-flwr/fit-noise/v1"


def add_noise(stats: MapStatistics, noise: FitNoise, generator: torch.Generator | None = None) -> MapStatistics:
    """``stats`` plus the Gaussian noise of ``noise``. The draws come from a fresh key of OS
    entropy (numpy's Philox keyed with 128 bits of it: torch's ``manual_seed`` would keep only 32
    bits, few enough to search, and the integer counts would tell the searcher when it had found
    the seed); nothing the cloud sends enters them. ``generator``: a seeded stand-in for tests.
    The second moments' noise is symmetric (one draw per entry of the upper triangle, diagonal
    included)."""
    stream = NoiseKey.fresh().stream(_FIT_NOISE, []) if generator is None else None
    s_count, s_sum, s_second = noise.sigmas()

    def normal(shape, sd):
        if stream is not None:
            return torch.from_numpy(stream.numpy.standard_normal(tuple(shape))) * sd
        return torch.randn(shape, generator=generator, dtype=torch.float64) * sd

    d = stats.second.shape[0]
    upper = torch.triu(normal((d, d), s_second))
    second = stats.second + upper + torch.triu(upper, 1).T
    return MapStatistics(stats.counts + normal(stats.counts.shape, s_count), stats.sums + normal(stats.sums.shape, s_sum),
                         second, stats.special_counts + normal(stats.special_counts.shape, s_count),
                         stats.special_sums + normal(stats.special_sums.shape, s_sum))


MIN_CLASS_TOKENS = 1.0  # a class whose (noisy) token count is below this is treated as absent


def classes_present(stats: MapStatistics) -> list[int]:
    return [c for c, n in enumerate(stats.counts.tolist()) if n >= MIN_CLASS_TOKENS]


def _psd(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The nearest positive semi-definite matrix (negative eigenvalues set to 0), and the share of
    the spectrum's mass that was negative (noise, or a hostile sum)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    negative = float(values.clamp_max(0).abs().sum() / values.abs().sum().clamp_min(1e-300))
    return (vectors * values.clamp_min(0)) @ vectors.T, negative


def derive_subspace(stats: MapStatistics, rank: int, *, special_ids, shrink: float = 0.5,
                    weights: torch.Tensor | None = None) -> Subspace:
    """The label map of the federation's statistics, computed by the device itself: the span of
    ``weights`` ``[d, rank]`` (the reader rounds' projection, :mod:`privtune_flwr.federated_reader`)
    or, without them, the closed-form fit's basis
    (:func:`~privtune_flwr.mechanism.subspace.basis_from_moments`, the same arithmetic as
    ``fit_subspace(..., method="closed-form")`` on the union of the tokens), put into a frame fixed
    by the statistics (between-class scatter of the coordinates, signs by the class trend; where a
    column has no trend, its largest entry is made positive: a third-moment tie-break needs data a
    sum of second moments does not hold). Raises ValueError for fewer than 2 classes, or for
    ``weights`` of another shape, non-finite or of lower rank."""
    present = classes_present(stats)
    if len(present) < 2:
        raise ValueError(f"the federation's statistics hold {len(present)} class(es) with tokens "
                         f"({[round(float(n), 1) for n in stats.counts]} tokens per class); the label map needs at least 2")
    idx = torch.tensor(present)
    counts, sums = stats.counts[idx], stats.sums[idx]
    total_n = float(counts.sum())
    center = sums.sum(0) / total_n
    means = sums / counts.unsqueeze(1)
    within, _ = _psd(stats.second - (means.T * counts) @ means)
    total, _ = _psd(stats.second - total_n * torch.outer(center, center))
    if weights is None:
        basis = basis_from_moments(means, counts, within, total, rank, shrink=shrink).double()
    else:
        weights = torch.as_tensor(weights).double()
        if tuple(weights.shape) != (stats.second.shape[0], rank) or not torch.isfinite(weights).all():
            raise ValueError(f"the map's weights have shape {tuple(weights.shape)}; accepted: finite values of shape "
                             f"{(stats.second.shape[0], rank)}")
        basis, r = torch.linalg.qr(weights)
        diag = torch.diagonal(r).abs()
        if float(diag.min()) <= 1e-6 * float(diag.max().clamp_min(1e-300)):
            raise ValueError(f"the map's weights have rank below {rank} (QR diagonal {diag.tolist()}); accepted: full rank")
    # the data-fixed frame, from class means and scatter in the coordinates
    k = basis.shape[1]
    m = (means - center) @ basis  # [C', k]
    between = (m.T * counts) @ m
    totk = basis.T @ total @ basis
    scatter = between / between.trace().clamp_min(1e-12) + 1e-3 * totk / totk.trace().clamp_min(1e-12)
    _, vectors = torch.linalg.eigh(scatter)
    vectors = vectors.flip(1)
    y = idx.double()
    trend = ((m @ vectors) * (counts * (y - (counts * y).sum() / total_n)).unsqueeze(1)).sum(0) / total_n
    spread = torch.sqrt(torch.diagonal(vectors.T @ totk @ vectors).clamp_min(0) / total_n).clamp_min(1e-12)
    basis = basis @ vectors
    largest = basis.gather(0, basis.abs().argmax(0, keepdim=True)).squeeze(0)
    sign = torch.where(trend.abs() > 1e-9 * spread, trend.sign(), largest.sign())
    sign[sign == 0] = 1.0
    basis = (basis * sign).float()
    special_ids = torch.as_tensor(special_ids, dtype=torch.long)
    seen = stats.special_counts >= MIN_CLASS_TOKENS
    special = (stats.special_sums[seen] / stats.special_counts[seen].unsqueeze(1)).float()
    del k
    return Subspace(center=center.float(), basis=basis.contiguous(), special_ids=special_ids[seen], special=special,
                    reader_accuracy=float("nan"))


# -- the device's audit of a map ---------------------------------------------------------------


@dataclass
class MapAudit:
    """What a device measured of a map on its own data (public numbers: rates, not data)."""

    inversion: float  # held-out top-1 token recovery of an inverter trained through the map
    label: float | None  # held-out sentence-label accuracy through the map (None: one class on the device)
    majority: float  # the held-out rate of guessing the device's most frequent token
    seconds: float

    def metrics(self) -> dict[str, float]:
        out = {"map-inversion": self.inversion, "map-token-majority": self.majority, "map-audit-seconds": self.seconds}
        if self.label is not None:
            out["map-label-accuracy"] = self.label
        return out


def released_coordinates(defense, rows, ids) -> list[torch.Tensor]:
    """Each sentence's regular tokens released by ``defense`` (a ``LabelSubspaceDefense``), in the
    map's own ``k`` coordinates: what the cloud sees of them, minus the public frame."""
    out = []
    special = defense.special_ids
    for r, t in zip(rows, ids):
        released = defense(r[None], t[None], torch.ones(1, len(t), dtype=torch.long))[0]
        keep = ~torch.isin(t, special)
        out.append(((released[keep].double() - defense.center64) @ defense.basis64).float())
    return out


def audit_map(coords: list[torch.Tensor], ids, labels, *, special_ids, epochs: int = 6, hidden: int = 64,
              held_out: float = 0.3, seed: int = 0, max_tokens: int = 40_000) -> MapAudit:
    """Train a small token inverter (an MLP from a token's released coordinates ``[k]`` to its id)
    on a share of the device's sentences and score its top-1 recovery on the rest; read the label
    back the same way (a linear classifier on each sentence's mean coordinates). The split and the
    inverter's initialisation follow ``seed``; the releases already carry the device's noise."""
    start = time.perf_counter()
    n = len(coords)
    if n < 4:
        raise ValueError(f"the map audit needs at least 4 sentences on the device; it holds {n}")
    special_ids = torch.as_tensor(special_ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    cut = max(1, int(round(n * (1 - held_out))))
    train_i, test_i = order[:cut].tolist(), order[cut:].tolist()
    tok = [t[~torch.isin(t, special_ids)] for t in ids]
    xtr, ttr = torch.cat([coords[i] for i in train_i]), torch.cat([tok[i] for i in train_i])
    xte, tte = torch.cat([coords[i] for i in test_i]), torch.cat([tok[i] for i in test_i])
    if len(xtr) > max_tokens:  # a bounded cost per audit
        pick = torch.randperm(len(xtr), generator=generator)[:max_tokens]
        xtr, ttr = xtr[pick], ttr[pick]
    vocab, target = torch.unique(ttr, return_inverse=True)
    k = xtr.shape[1]
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(k, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                  torch.nn.ReLU(), torch.nn.Linear(hidden, len(vocab)))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=generator)
            for s in range(0, len(perm), 256):
                b = perm[s:s + 256]
                loss = torch.nn.functional.cross_entropy(net((xtr[b] - mu) / sd), target[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            guess = vocab[net((xte - mu) / sd).argmax(-1)]
    inversion = float((guess == tte).float().mean()) if len(tte) else 0.0
    top = torch.bincount(ttr).argmax()
    majority = float((tte == top).float().mean()) if len(tte) else 0.0
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    label = None
    if labels.unique().numel() >= 2:
        feats = torch.stack([c.mean(0) if len(c) else torch.zeros(k) for c in coords])
        present = labels[train_i].unique()
        centroids = torch.stack([feats[train_i][labels[train_i] == c].mean(0) for c in present])
        guess_y = present[torch.cdist(feats[test_i], centroids).argmin(1)]
        label = float((guess_y == labels[test_i]).float().mean())
    return MapAudit(inversion=inversion, label=label, majority=majority, seconds=time.perf_counter() - start)


class MapRefused(ValueError):
    """The device's audit found the map unsafe (or useless) on its own data."""


def check_audit(audit: MapAudit, *, max_inversion: float, min_label: float) -> None:
    if audit.inversion > max_inversion:
        raise MapRefused(f"this device refuses the label map: an inverter trained through it on the device's own data "
                         f"recovers {audit.inversion:.3f} of held-out tokens (most frequent token alone: "
                         f"{audit.majority:.3f}); its floor is max-map-inversion={max_inversion:g}")
    if audit.label is not None and audit.label < min_label:
        raise MapRefused(f"this device refuses the label map: the label reads back at {audit.label:.3f} on its held-out "
                         f"sentences; its floor is min-map-label-accuracy={min_label:g}")


# -- the cloud's side: summing contributions -------------------------------------------------------


def aggregate(contributions, *, classes: int, hidden: int, specials: int):
    """Sum ``(name, arrays)`` contributions; returns ``(sum or None, accepted names, rejected
    [(name, reason)])``. One bad contribution (wrong names or shapes, non-finite, asymmetric) is
    left out and the sum goes on."""
    total, accepted, rejected = None, [], []
    for name, arrays in contributions:
        try:
            stats = MapStatistics.from_arrays(arrays, classes=classes, hidden=hidden, specials=specials)
        except (ValueError, TypeError, KeyError) as exc:
            rejected.append((name, str(exc)))
            continue
        total = stats if total is None else total + stats
        accepted.append(name)
    return total, accepted, rejected


# -- the device's side, as the ClientApp calls it ---------------------------------------------------

AGGREGATE = "federated-map"  # context.state ArrayRecord: the map the device derived from the sum and accepted
AUDIT = "federated-map-audit"  # context.state ConfigRecord: {"digest" of the sum, "map-digest", public audit numbers}


class NoMap(torch.nn.Module):
    """The defence of a device that has not yet accepted the federation's map: it releases nothing."""

    name = "label-subspace"

    def __init__(self):
        super().__init__()
        self.key = None

    def forward(self, *_):
        raise RuntimeError("this device holds no accepted federation label map yet (defense.label-subspace.fit-scope='federation'); "
                           "it releases nothing until the cloud sends the map's statistics (query.map) and its audit passes")

    def fingerprint(self):
        raise RuntimeError("no accepted federation label map yet")

    def statement(self):
        raise RuntimeError("no accepted federation label map yet")


def fit_noise(cfg, policy) -> FitNoise | None:
    """The noise this device adds: from its own floor (fit-epsilon, fit-delta), the run's public
    clip and model.max-length. None when its floor says fit-epsilon = inf."""
    if math.isinf(policy.fit_epsilon):
        return None
    from .federated_reader import STATS_SHARE

    share = STATS_SHARE if int(cfg.subspace_fit_rounds) > 0 else 1.0  # the reader steps get the rest
    return FitNoise(policy.fit_epsilon, policy.fit_delta, float(cfg.subspace_fit_clip), int(cfg.max_length), share)


def device_contribution(rows, ids, labels, *, cfg, policy, special_ids) -> tuple[MapStatistics, dict[str, float]]:
    """What one device sends for the fit: its clipped, noised statistics, and public numbers."""
    start = time.perf_counter()
    stats = token_statistics(rows, ids, labels, num_labels=cfg.num_labels, special_ids=special_ids,
                             clip=float(cfg.subspace_fit_clip))
    noise = fit_noise(cfg, policy)
    if noise is not None:
        stats = add_noise(stats, noise)
    sd = (0.0, 0.0, 0.0) if noise is None else noise.sigmas()
    metrics = {"fit-epsilon": policy.fit_epsilon, "fit-delta": policy.fit_delta, "fit-noise-sd-counts": sd[0],
               "fit-noise-sd-sums": sd[1], "fit-noise-sd-second": sd[2], "fit-seconds": time.perf_counter() - start,
               "bytes-sent": float(stats.nbytes)}
    return stats, metrics


# -- the cloud's side, as the strategy calls it -----------------------------------------------------


def reader_message(node: int, weights: dict, center: torch.Tensor, scale: float, round_: int):
    """The ``query.reader`` message of one reader round: the weights, the statistics' centre and
    spread (:func:`~privtune_flwr.federated_reader.frame_of`) and the round number."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from .federated_reader import READER_ACTION

    return Message(content=RecordDict({"weights": ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
                                       "frame": ArrayRecord({"center": Array(np.asarray(center))}),
                                       "config": ConfigRecord({"round": int(round_), "scale": float(scale)})}),
                   message_type="query." + READER_ACTION, dst_node_id=node)


class FederationMap:
    """The cloud's part of the fit phase: ask every connected device for its statistics once
    (``query.fit``), sum the valid ones, and send the sum (``query.map``) to each device that has
    not yet got it (late joiners too: they get the same sum, not a refit). It never sends a basis.
    ``info`` keeps the public numbers of the phase (for the run's history and summary)."""

    def __init__(self, cfg, *, hidden: int, specials: int):
        self.cfg, self.hidden, self.specials = cfg, hidden, specials
        self.total: MapStatistics | None = None
        self.sent: set[int] = set()  # devices the sum was sent to (accepted or refused: not asked again)
        self.accepted: set[int] = set()
        self.weights = None  # the reader rounds' final W [d, k] (None: no reader rounds, the closed-form map)
        self.info: dict[str, float] = {}

    def _record(self):
        from flwr.app import Array, ArrayRecord, RecordDict

        from .federated_reader import WEIGHTS

        content = {"statistics": ArrayRecord({k: Array(v) for k, v in self.total.to_numpy().items()})}
        if self.weights is not None:
            content["weights"] = ArrayRecord({WEIGHTS: Array(self.weights)})
        return RecordDict(content)

    def _in_groups(self, grid, build, nodes, *, timeout: float, max_reply_bytes: int):
        """``send_and_receive`` over ``nodes`` in groups of ``GROUP``, so that the cloud holds at
        most ``GROUP`` outgoing copies of a large message at once."""
        replies = []
        for s in range(0, len(nodes), GROUP):
            messages = [build(n) for n in nodes[s:s + GROUP]]
            replies += grid.send_and_receive(messages, timeout=timeout, max_reply_bytes=max_reply_bytes)
            del messages
        return replies

    def _reader_rounds(self, grid, nodes, *, timeout: float, name=str) -> None:
        """The reader rounds (:mod:`privtune_flwr.federated_reader`): send the weights, apply the
        mean of the valid changes (or, ``fit-optimizer = "cloud"``, one Adam step on the sum of the
        valid noisy gradient sums, each capped at ``NORM_CAP`` x the round's median), ``fit-rounds``
        times; keeps the final ``W``."""
        from .federated_reader import (WEIGHTS, CloudAdam, ReaderPlan, frame_of, initial_weights, mean_change,
                                       COORD_CAP, NORM_CAP, reader_record, reader_shapes,
                                       step_bound, summed_gradient)
        from .schema import NPY_HEADER_MAX, REPLY_RECORDS_SLACK

        plan = ReaderPlan.from_config(self.cfg)
        start = time.perf_counter()
        weights = {k: torch.from_numpy(v) for k, v in initial_weights(plan, self.hidden, int(self.cfg.seed)).items()}
        center, scale = frame_of(self.total)
        shapes = reader_shapes(plan, self.hidden)
        bound = step_bound(plan)
        record = reader_record(plan)
        cloud = CloudAdam(weights, plan.lr) if plan.optimizer == "cloud" else None
        scaled_down = 0
        reply_bytes = sum(4 * math.prod(v) for v in shapes.values()) + len(shapes) * NPY_HEADER_MAX + REPLY_RECORDS_SLACK
        down = sum(4 * math.prod(v) for v in shapes.values()) + 4 * self.hidden
        accepted_per_round, up = [], []
        sampler = torch.Generator().manual_seed(int(self.cfg.seed))
        per_round = int(self.cfg.subspace_fit_devices) or len(nodes)
        everyone = list(nodes)
        asked = dict.fromkeys(everyone, 0)  # reader rounds each device was asked
        for r in range(plan.rounds):
            if per_round < len(everyone):  # a device not asked spends nothing of its budget this round
                pick = torch.randperm(len(everyone), generator=sampler)[:per_round].sort().values.tolist()
                nodes = [everyone[i] for i in pick]
            for n in nodes:
                asked[n] += 1
            def build(n, r=r):
                return reader_message(n, weights, center, scale, r + 1)

            changes, errors = [], []
            for reply in self._in_groups(grid, build, nodes, timeout=timeout, max_reply_bytes=reply_bytes):
                src = reply.metadata.src_node_id
                if reply.has_error():
                    errors.append((name(src), reply.error.reason))
                    continue
                try:
                    change = {k: v.numpy() for k, v in reply.content.array_records[record].items()}
                    up.append(sum(a.nbytes for a in change.values()))
                    changes.append((name(src), change))
                except (KeyError, AttributeError, TypeError) as exc:
                    errors.append((name(src), f"no {record} in the reply ({exc})"))
            if cloud is None:
                mean, accepted, rejected = mean_change(changes, shapes, bound)
                if mean is not None:
                    weights = {k: weights[k] + mean[k] for k in weights}
            else:
                summed, accepted, rejected, scaled = summed_gradient(changes, shapes)
                if summed is not None:
                    weights = cloud.step(weights, summed)
                scaled_down += len(scaled)
                for who in scaled:
                    cloud_log.warning("federation map, reader round %d: %s's gradient capped (at %.0fx the round's "
                                      "median norm, or in a coordinate at %.0fx the spread about the median)", r + 1,
                                      who, NORM_CAP, COORD_CAP)
            for who, why in errors + rejected:
                cloud_log.warning("federation map, reader round %d: %s's %s left out: %s", r + 1, who, record, why)
            accepted_per_round.append(len(accepted))
            cloud_log.info("federation map, reader round %d of %d: %d of %d asked devices' %ss applied", r + 1,
                           plan.rounds, len(accepted), len(nodes), record)
        self.weights = weights[WEIGHTS].numpy().astype(np.float32)
        self.info.update({"map-reader-rounds": float(plan.rounds),
                          "map-reader-scaled-down": float(scaled_down),
                          "map-reader-accepted-min": float(min(accepted_per_round)) if accepted_per_round else 0.0,
                          "map-reader-seconds": time.perf_counter() - start,
                          # per device: the mean over the federation (a device not asked in a round
                          # receives and sends nothing then), and the most any one device received
                          "map-reader-bytes-down-per-device": float(down * sum(asked.values()) / max(1, len(everyone))),
                          "map-reader-bytes-up-per-device": float(sum(up) / max(1, len(everyone))),
                          "map-reader-bytes-down-most-per-device": float(down * max(asked.values(), default=0)),
                          "map-reader-bytes-per-asked-device-round": float(down)})

    def fit_reply_bytes(self) -> int:
        """The most a device's fit reply may carry: the statistics' five float64 arrays
        (:class:`MapStatistics`) with their npy headers, and its metrics. A larger reply is dropped
        as it arrives, unread."""
        from .schema import NPY_HEADER_MAX, REPLY_RECORDS_SLACK

        c, h, s = self.cfg.num_labels, self.hidden, self.specials
        return 8 * (c + c * h + h * h + s + s * h) + len(ARRAYS) * NPY_HEADER_MAX + REPLY_RECORDS_SLACK

    def ensure(self, grid, nodes, *, timeout: float, name=str) -> None:
        """Fit the map once (ask ``nodes`` for their statistics and sum them), then send the sum to
        every node not yet sent it. ``grid``: a grid whose ``send_and_receive`` takes
        ``max_reply_bytes`` (:class:`strategies.reporting.ProgressGrid`)."""
        from flwr.app import Message, RecordDict

        from .schema import REPLY_RECORDS_SLACK

        if self.total is None:
            start = time.perf_counter()
            total, accepted, rejected, errors, up = None, [], [], [], []
            for s in range(0, len(nodes), GROUP):  # summed group by group: the cloud holds GROUP contributions at most
                asked = [Message(content=RecordDict(), message_type="query." + FIT_ACTION, dst_node_id=n)
                         for n in nodes[s:s + GROUP]]
                contributions = []
                for reply in grid.send_and_receive(asked, timeout=timeout, max_reply_bytes=self.fit_reply_bytes()):
                    src = reply.metadata.src_node_id
                    if reply.has_error():
                        errors.append((name(src), reply.error.reason))
                        continue
                    try:
                        arrays = reply.content.array_records["statistics"]
                        up.append(sum(a.numpy().nbytes for a in arrays.values()))
                        contributions.append((name(src), {k: v for k, v in arrays.items()}))
                    except (KeyError, AttributeError, TypeError) as exc:
                        errors.append((name(src), f"no statistics in the reply ({exc})"))
                part, ok, bad = aggregate(contributions, classes=self.cfg.num_labels, hidden=self.hidden,
                                          specials=self.specials)
                del contributions, asked
                if part is not None:
                    total = part if total is None else total + part
                accepted += ok
                rejected += bad
            for who, why in errors + rejected:
                cloud_log.warning("federation map: %s's statistics left out: %s", who, why)
            present = [] if total is None else classes_present(total)
            if len(present) < 2:
                raise ValueError(f"the federation's label map needs at least 2 classes with tokens; the {len(accepted)} "
                                 f"valid contribution(s) of {len(nodes)} devices hold {len(present)}"
                                 + ("" if total is None else f" (tokens per class {[round(float(n)) for n in total.counts]})")
                                 + ": stopping before round 1")
            self.total = total
            cloud_log.info("federation map: summed %d of %d devices' statistics (%d left out), %d classes, %.0f tokens; "
                           "%.0f bytes up per device", len(accepted), len(nodes), len(errors) + len(rejected), len(present),
                           float(total.counts.sum()), sum(up) / max(1, len(up)))
            if int(self.cfg.subspace_fit_rounds) > 0:
                self._reader_rounds(grid, nodes, timeout=timeout, name=name)
            self.info.update({"map-contributions": float(len(accepted)), "map-rejected": float(len(errors) + len(rejected)),
                              "map-bytes-up-per-device": float(sum(up) / max(1, len(up))),
                              "map-bytes-down-per-device": float(total.nbytes + (0 if self.weights is None else
                                                                                  self.weights.nbytes)),
                              "map-fit-seconds": time.perf_counter() - start})
        new = [n for n in nodes if n not in self.sent]
        if not new:
            return
        start = time.perf_counter()
        self.sent.update(new)
        inversions = []
        for reply in self._in_groups(grid, lambda n: Message(content=self._record(), message_type="query." + MAP_ACTION,
                                                             dst_node_id=n), new, timeout=timeout,
                                     max_reply_bytes=REPLY_RECORDS_SLACK):
            src = reply.metadata.src_node_id
            if reply.has_error():
                cloud_log.warning("federation map: %s did not accept the map: %s", name(src), reply.error.reason)
                continue
            self.accepted.add(src)
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and "map-inversion" in metrics:
                inversions.append(float(metrics["map-inversion"]))
        self.info["map-accepted"] = float(len(self.accepted))
        self.info["map-send-seconds"] = self.info.get("map-send-seconds", 0.0) + time.perf_counter() - start
        if inversions:
            self.info["map-inversion-max"] = max(inversions + [self.info.get("map-inversion-max", 0.0)])
        cloud_log.info("federation map: sent to %d device(s); %d of %d accepted so far%s", len(new), len(self.accepted),
                 len(self.sent), f"; device audits' inversion at most {self.info['map-inversion-max']:.3f}"
                 if inversions else "")
