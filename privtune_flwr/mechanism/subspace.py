"""A label subspace fitted on the device's own labelled data: what a token keeps when released.

The cloud's top needs the sentence label; an inverter needs each token's identity. A release that
keeps, per token, only a few directions that predict the label loses identity within every group
of tokens with the same label relevance (most of them: function words, punctuation, names). This
module fits those directions once, on the device, from its own data, and freezes them:

* ``center`` ``[d]``: the mean representation of the device's regular (non-special) tokens;
* ``basis`` ``[d, k]``: orthonormal directions. They are the token projection of a small reader
  (a linear map ``d -> k``, one self-attention layer over the projected tokens, mean pooling and a
  linear head) trained to predict the sentence label from the projected tokens alone, so the
  directions are those a contextual reader of the release can use;
* ``special`` ``[S, d]``: for each special token (``[CLS]``, ``[SEP]``, ...), the mean of its
  representations: it is released as that public constant, which carries nothing about the text.

Fitting is deterministic given the data and the seed (a local generator; one thread gives the
same float sums). Only the device's own representations and labels are read; nothing leaves it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)
SKEW_WARNING = 0.3  # warn when a class has fewer sentences than this fraction of an equal share


@dataclass
class Subspace:
    """A fitted label subspace; see the module docstring. ``special_ids`` ``[S]`` index ``special``."""

    center: torch.Tensor
    basis: torch.Tensor
    special_ids: torch.Tensor
    special: torch.Tensor
    reader_accuracy: float  # the fit's own training accuracy (a device-side diagnostic)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def check(self, hidden_size: int) -> None:
        d, k = self.basis.shape
        if d != hidden_size or tuple(self.center.shape) != (d,) or self.special.shape[1:] != (d,):
            raise ValueError(f"subspace of size {d} (center {tuple(self.center.shape)}, special "
                             f"{tuple(self.special.shape)}) does not match hidden size {hidden_size}")
        if not 1 <= k <= d:
            raise ValueError(f"subspace rank {k} is outside the accepted range 1..{d}")
        gram = self.basis.T @ self.basis
        if not torch.allclose(gram, torch.eye(k), atol=1e-4):
            raise ValueError("subspace basis columns are not orthonormal")

    def state(self) -> dict[str, torch.Tensor]:
        return {"center": self.center, "basis": self.basis, "special_ids": self.special_ids, "special": self.special}


class _Reader(nn.Module):
    """Projected tokens ``[B, T, k]`` -> one self-attention layer -> masked mean -> label logits."""

    def __init__(self, rank: int, classes: int, width: int, max_len: int):
        super().__init__()
        self.inp = nn.Linear(rank, width)
        self.pos = nn.Embedding(max_len, width)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, 0.1, batch_first=True)
        self.out = nn.Linear(width, classes)

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.inp(f) + self.pos(torch.arange(f.shape[1]))[None]
        x = self.layer(x, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.out((x * m).sum(1) / m.sum(1).clamp_min(1.0))


def _pad(rows: list[torch.Tensor], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    hidden = torch.zeros(len(rows), width, rows[0].shape[-1])
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, ids)):
        hidden[i, : len(r)], tokens[i, : len(r)], mask[i, : len(r)] = r, t, 1
    return hidden, tokens, mask


@dataclass
class DeviceTokens:
    """What both label fits first read off the device's tokens (see :func:`device_tokens`)."""

    labels: torch.Tensor  # [N] the sentences' classes
    special_ids: torch.Tensor  # the model's special ids
    tokens: torch.Tensor  # [M] every token id, flattened
    regular: torch.Tensor  # [M] True where the token is not special
    center: torch.Tensor  # [d] the regular tokens' mean representation
    scale: float  # their mean spread per dimension
    present: torch.Tensor  # the special ids that occur
    special: torch.Tensor  # [len(present), d] each one's mean representation


def device_tokens(fit: str, rows: list[torch.Tensor], ids: list[torch.Tensor], labels, *, rank: int,
                  special_ids) -> DeviceTokens:
    """Check the inputs of the label fit ``fit`` (its name goes into the errors) and compute the
    statistics of the device's tokens it starts from."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is outside the accepted range: an integer >= 1")
    if not rows or len(rows) != len(ids) or len(rows) != len(labels):
        raise ValueError(f"{fit} needs as many rows, ids and labels (got {len(rows)}, {len(ids)}, {len(labels)}), "
                         "at least one")
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    classes, counts = labels.unique(return_counts=True)
    if classes.numel() < 2:
        raise ValueError(f"{fit} needs at least 2 classes in the device's labels; got {classes.tolist()}")
    if counts.min() < SKEW_WARNING * len(labels) / classes.numel():
        # screened with 10 Dirichlet(0.5) devices on Rotten Tomatoes (docs/results.md, "Label maps in a federation"): maps
        # fitted on 4% or 10% of one class released test sentences a reader scored at 0.51 and 0.57,
        # against 0.68-0.74 for devices with 20-48%
        shares = ", ".join(f"{int(c)}: {int(n)}" for c, n in zip(classes, counts))
        log.warning("%s: the device's labels are skewed (sentences per class %s; the smallest class is under %.0f%% "
                    "of an equal share): the map it fits carries little of the label, and the cloud's top reads "
                    "this device's releases poorly", fit, shares, 100 * SKEW_WARNING)
    d = rows[0].shape[-1]
    if rank > d:
        raise ValueError(f"rank={rank} is outside the accepted range 1..{d} (the hidden size)")
    special_ids = torch.as_tensor(special_ids, dtype=torch.long)
    flat_h, flat_t = torch.cat(rows), torch.cat(ids)
    regular = ~torch.isin(flat_t, special_ids)
    if not regular.any():
        raise ValueError(f"{fit} found no regular (non-special) token in the device's data")
    present = [s for s in special_ids.tolist() if bool((flat_t == s).any())]
    special = torch.stack([flat_h[flat_t == s].mean(0) for s in present]) if present else torch.zeros(0, d)
    return DeviceTokens(labels=labels, special_ids=special_ids, tokens=flat_t, regular=regular,
                        center=flat_h[regular].mean(0), scale=float(flat_h[regular].std(0).mean()),
                        present=torch.tensor(present, dtype=torch.long), special=special)


SUBSPACE_FITS = ("reader", "closed-form")


def closed_form_basis(tokens: torch.Tensor, classes: torch.Tensor, rank: int, *, shrink: float = 0.5) -> torch.Tensor:
    """An orthonormal ``[d, rank]`` basis fitted without training, from tokens ``[N, d]`` labelled with
    their sentences' classes ``[N]``: the Fisher discriminant directions (at most classes - 1; the
    within-class scatter shrunk by ``shrink`` towards its mean eigenvalue, so that a few hundred
    sentences estimate it), then, to fill the rank, the tokens' leading principal directions."""
    x = tokens.double()
    present, index = classes.unique(return_inverse=True)
    means = torch.stack([x[index == c].mean(0) for c in range(len(present))])
    within = x - means[index]
    centred = x - x.mean(0)
    counts = torch.bincount(index, minlength=len(present)).to(x.dtype)
    return basis_from_moments(means, counts, within.T @ within, centred.T @ centred, rank, shrink=shrink)


def basis_from_moments(means: torch.Tensor, counts: torch.Tensor, within: torch.Tensor, total: torch.Tensor, rank: int,
                       *, shrink: float = 0.5) -> torch.Tensor:
    """:func:`closed_form_basis` from the tokens' sufficient statistics: class means ``[C, d]``,
    tokens per class ``[C]``, the within-class scatter ``sum (x - m_c)(x - m_c)^T`` and the total
    scatter ``sum (x - m)(x - m)^T`` (both ``[d, d]``, unnormalised). A federation that sums its
    devices' per-class sums, counts and second moments computes exactly what one device holding all
    the tokens would (:mod:`privtune_flwr.federated_map`)."""
    if not 0.0 < shrink <= 1.0:
        raise ValueError(f"shrink={shrink!r} is outside the accepted range (0, 1]")
    means, counts, within, total = means.double(), counts.double(), within.double(), total.double()
    n = float(counts.sum())
    scatter = within / n
    d = scatter.shape[0]
    if not torch.isfinite(scatter).all() or float(scatter.trace()) <= 0:
        raise ValueError("closed_form_basis needs tokens that vary within their classes, with finite values; "
                         f"got a within-class scatter of trace {float(scatter.trace())!r}")
    scatter = (1 - shrink) * scatter + shrink * scatter.trace() / d * torch.eye(d, dtype=scatter.dtype)
    mean = (means * counts.unsqueeze(1)).sum(0) / n
    spread = (means - mean) * counts.sqrt().unsqueeze(1) / math.sqrt(n)  # between = spread.T @ spread
    # the generalised eigenproblem between v = lambda * scatter v, through scatter's Cholesky factor
    factor = torch.linalg.cholesky(scatter)
    whitened = torch.linalg.solve_triangular(factor, spread.T, upper=False)  # L^-1 spread.T
    u, _, _ = torch.linalg.svd(whitened, full_matrices=False)
    discriminant = min(rank, len(means) - 1)
    columns = [torch.linalg.solve_triangular(factor.T, u[:, :discriminant], upper=True)]
    if rank > discriminant:
        columns.append(torch.linalg.eigh(total)[1].flip(1)[:, :rank - discriminant])
    basis, _ = torch.linalg.qr(torch.cat(columns, 1))
    return basis.float()


def fit_subspace(rows: list[torch.Tensor], ids: list[torch.Tensor], labels, *, rank: int, special_ids: torch.Tensor,
                 epochs: int = 4, lr: float = 3e-3, width: int = 64, batch_size: int = 64, seed: int = 0,
                 method: str = "reader") -> Subspace:
    """Fit a rank-``rank`` label subspace on a device's own data.

    ``rows[i]`` ``[n_i, d]``: the bottom's representations of sequence ``i`` (real tokens only, in
    order); ``ids[i]`` ``[n_i]``: its token ids; ``labels[i]``: its class. ``method``: ``"reader"``
    (the module docstring) or ``"closed-form"`` (:func:`closed_form_basis`: nothing trained, and
    estimated well from a few hundred sentences, so that devices fitting apart release nearly the
    same vectors; its ``reader_accuracy`` is that of the nearest class mean of the sentences'
    projected mean tokens). Returns a :class:`Subspace`; the same inputs and ``seed`` give the same
    subspace.
    """
    if method not in SUBSPACE_FITS:
        raise ValueError(f"method={method!r} is not accepted; accepted: {', '.join(SUBSPACE_FITS)}")
    stats = device_tokens("fit_subspace", rows, ids, labels, rank=rank, special_ids=special_ids)
    classes = stats.labels.unique().numel()
    if rank < classes - 1:
        # a linear reader separates K classes in K - 1 directions; with fewer the top loses accuracy
        # (bbc_news, 5 topics, split 3: rank 2 cost 5.7%, rank 4 nothing; docs/results.md)
        log.warning("label-subspace rank %d is below the %d classes - 1 of the device's labels: the release keeps "
                    "fewer directions than the classes need, expect an accuracy cost (subspace-rank >= %d advised)",
                    rank, classes, classes - 1)
    if method == "closed-form":
        return _closed_form_subspace(rows, stats, rank)
    labels, special_ids, center, scale = stats.labels, stats.special_ids, stats.center, stats.scale
    d = rows[0].shape[-1]
    max_len = max(len(r) for r in rows)

    def features(index, basis):
        hidden, tokens, mask = _pad([rows[i] for i in index], [ids[i] for i in index])
        regular = mask.bool() & ~torch.isin(tokens, special_ids)
        return ((hidden - center) @ basis) * regular.unsqueeze(-1) / scale, mask

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the reader's init and dropout follow the seed, not the caller's RNG
        torch.manual_seed(seed)
        weight = nn.Parameter(torch.randn(d, rank, generator=generator) / math.sqrt(d))
        reader = _Reader(rank, int(labels.max()) + 1, width, max_len)
        optimiser = torch.optim.Adam([weight, *reader.parameters()], lr=lr)
        reader.train()
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                b = order[start:start + batch_size]
                basis, _ = torch.linalg.qr(weight)
                f, mask = features(b, basis)
                loss = F.cross_entropy(reader(f, mask), labels[b])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        reader.eval()
        with torch.no_grad():
            basis, _ = torch.linalg.qr(weight.detach())
            correct = 0
            for start in range(0, len(rows), 256):
                b = list(range(start, min(start + 256, len(rows))))
                f, mask = features(b, basis)
                correct += int((reader(f, mask).argmax(-1) == labels[b]).sum())
    basis = _canonical(basis, rows, ids, labels, center, special_ids)
    return Subspace(center=center, basis=basis.contiguous(), special_ids=stats.present, special=stats.special,
                    reader_accuracy=correct / len(rows))


def _closed_form_subspace(rows: list[torch.Tensor], stats: DeviceTokens, rank: int) -> Subspace:
    lengths = torch.tensor([len(r) for r in rows])
    sentence = torch.repeat_interleave(torch.arange(len(rows)), lengths)[stats.regular]
    tokens = torch.cat(rows)[stats.regular]
    classes = stats.labels[sentence]
    basis = closed_form_basis(tokens, classes, rank)
    # the data-fixed frame of _canonical, from the regular tokens already gathered here
    _, rotation = aligning_rotation((tokens - stats.center) @ basis, classes)
    basis = (basis.double() @ rotation).float()
    # diagnostic: each sentence's mean projected token, classified by the nearest class mean
    coords = (tokens - stats.center) @ basis
    means = torch.zeros(len(rows), rank).index_add_(0, sentence, coords)
    means /= torch.bincount(sentence, minlength=len(rows)).clamp_min(1).unsqueeze(1)
    present = stats.labels.unique()
    centroids = torch.stack([means[stats.labels == c].mean(0) for c in present])
    guess = present[torch.cdist(means, centroids).argmin(1)]
    return Subspace(center=stats.center, basis=basis.contiguous(), special_ids=stats.present, special=stats.special,
                    reader_accuracy=float((guess == stats.labels).float().mean()))


def _canonical(basis: torch.Tensor, rows, ids, labels: torch.Tensor, center: torch.Tensor,
               special_ids: torch.Tensor) -> torch.Tensor:
    """The same subspace in a basis fixed by the data rather than by the optimiser's path.

    Devices fit their subspaces apart, and the cloud's top reads them all: its input directions
    must mean the same on every device. Within the span, the columns become the eigenvectors of the
    between-class scatter of the tokens' coordinates (class means weighted by token counts), most
    discriminative first, ties broken by the coordinates' total scatter; each column's sign makes
    the class-weighted mean coordinate increase with the class index (else the skew positive).
    """
    coords, classes = [], []
    for r, t, y in zip(rows, ids, labels.tolist()):
        keep = ~torch.isin(t, special_ids)
        coords.append((r[keep] - center) @ basis)
        classes.append(torch.full((int(keep.sum()),), y))
    _, rotation = aligning_rotation(torch.cat(coords), torch.cat(classes))
    return (basis.double() @ rotation).float()


def aligning_rotation(coords: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [k], rotation [k, k])`` (float64) that put token coordinates ``[N, k]`` with sentence
    classes ``[N]`` into the data-fixed frame of :func:`_canonical`: ``(coords - mean) @ rotation``."""
    f, y = coords.double(), classes
    mean = f.mean(0)
    between = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
    for c in y.unique():
        d = f[y == c].mean(0) - mean
        between += (y == c).sum() * torch.outer(d, d)
    total = (f - mean).T @ (f - mean)
    scatter = between / between.trace().clamp_min(1e-12) + 1e-3 * total / total.trace().clamp_min(1e-12)
    _, vectors = torch.linalg.eigh(scatter)
    vectors = vectors.flip(1)  # descending eigenvalues
    g = (f - mean) @ vectors
    trend = (g * (y.double() - y.double().mean()).unsqueeze(1)).mean(0)
    skew = (g ** 3).mean(0)
    sign = torch.where(trend.abs() > 1e-9 * g.std(0).clamp_min(1e-12), trend.sign(), skew.sign())
    sign[sign == 0] = 1.0
    return mean, vectors * sign
