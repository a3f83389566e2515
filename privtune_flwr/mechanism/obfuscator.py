"""A learned label obfuscator, fitted on the device: a small network in place of a linear projection.

``label-subspace`` keeps, per token, ``k`` linear directions that predict the sentence label. A
network can keep more of the label in the same ``k`` numbers, and it can be trained to keep less
of the token's identity: this module fits, once, on the device's own labelled data,

* a per-token feature map ``u(h) = scale * g((h - center) / scale)`` (``g``: hidden size -> width
  -> width -> ``k``, GELU between), trained with a small contextual reader (one self-attention
  layer over the features, mean pooling, a linear head) to predict the label;
* against a token inverter trained alongside it (features -> the device's most frequent tokens):
  each step the inverter learns on the current features, and the map is pushed to raise the
  entropy of the inverter's prediction. Entropy, not the inverter's loss: the loss has no upper
  bound and is most easily raised by scrambling everything, the label included (screened: the
  reader fell to chance); entropy is bounded by the log of the inverter's vocabulary;
* after the fit, the features are put in a frame fixed by the data (centred, rotated to the
  between-class scatter's eigenvectors, signs by the class trend: the same rule as the subspace),
  so devices that fit apart give the top features whose directions mean the same. The maps stay
  non-linear and differ between devices beyond that frame;
* and given a fixed size: one factor makes their root-mean-square spread per direction equal
  ``scale``, the hidden representation's mean spread per dimension. The fit leaves the size
  arbitrary (the reader absorbs any scale), and against the entropy adversary it shrinks (the
  inverter, trained a step behind, is less sure of features that keep moving): at split 3 they
  came out about 5 times smaller than the projection's coordinates, the top took 500 steps or
  more to leave chance (docs/results.md), and d_chi noise at a given epsilon meant more than it does for
  the other defences. The factor keeps the learned geometry (the ratio between directions) and
  makes epsilon comparable across fits;
* ``lift`` ``[d, k]``: a public orthonormal map (a function of ``d`` and ``k`` only) that puts the
  ``k`` features back into the hidden space, so the top's input keeps its shape;
* ``special`` ``[S, d]``: each special token's mean representation, released as that constant.

Only the device's own representations and labels are read; nothing leaves it. The fit is
deterministic given the data and the seed (one thread gives the same float sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .subspace import _pad, _Reader, aligning_rotation, device_tokens

LAYERS = ("0", "2", "4")  # the Linear layers of the feature network (GELU between)


def public_lift(hidden_size: int, rank: int) -> torch.Tensor:
    """The public orthonormal ``[d, k]`` map from the ``k`` features into the hidden space."""
    q, _ = torch.linalg.qr(torch.randn(hidden_size, rank, generator=torch.Generator().manual_seed(0)))
    return q.contiguous()


def _network(d: int, k: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, k))


@dataclass
class Obfuscator:
    """A fitted obfuscator; see the module docstring. ``weights``: the network's Linear layers by
    name (``"0.weight"``, ``"0.bias"``, ... ``"4.bias"``), already in the aligned frame."""

    center: torch.Tensor
    scale: float
    weights: dict[str, torch.Tensor]
    lift: torch.Tensor
    special_ids: torch.Tensor
    special: torch.Tensor
    reader_accuracy: float  # the reader's accuracy on the device's own training data (diagnostic)
    inverter_accuracy: float  # the fit's own inverter, top-1 on the device's tokens at the end (diagnostic)
    fitted_spread: float = 0.0  # the features' RMS spread per direction before the size factor (diagnostic)

    @property
    def rank(self) -> int:
        return self.lift.shape[1]

    def check(self, hidden_size: int) -> None:
        d, k = self.lift.shape
        if d != hidden_size or tuple(self.center.shape) != (d,) or self.special.shape[1:] != (d,):
            raise ValueError(f"obfuscator of size {d} (center {tuple(self.center.shape)}, special "
                             f"{tuple(self.special.shape)}) does not match hidden size {hidden_size}")
        if not 1 <= k <= d:
            raise ValueError(f"obfuscator rank {k} is outside the accepted range 1..{d}")
        names = {f"{i}.{p}" for i in LAYERS for p in ("weight", "bias")}
        if set(self.weights) != names:
            raise ValueError(f"obfuscator weights must be exactly {sorted(names)}; got {sorted(self.weights)}")
        width = self.weights["0.weight"].shape[0]
        shapes = {"0.weight": (width, d), "0.bias": (width,), "2.weight": (width, width), "2.bias": (width,),
                  "4.weight": (k, width), "4.bias": (k,)}
        for name, shape in shapes.items():
            if tuple(self.weights[name].shape) != shape:
                raise ValueError(f"obfuscator weight {name} has shape {tuple(self.weights[name].shape)}, expected {shape}")
        tensors = (*self.weights.values(), self.center, self.special, self.lift)
        if not all(torch.isfinite(t).all() for t in tensors) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"obfuscator weights, centre, constants and lift must be finite and its scale > 0 "
                             f"(scale {self.scale!r})")
        if not torch.allclose(self.lift.T @ self.lift, torch.eye(k), atol=1e-4):
            raise ValueError("obfuscator lift columns are not orthonormal")

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> ``[..., k]``: the released coordinates before noise."""
        return feature_map(hidden, self.center, self.scale, self.weights)


def feature_map(hidden: torch.Tensor, center: torch.Tensor, scale: float, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    x = (hidden - center) / scale
    x = F.gelu(F.linear(x, weights["0.weight"], weights["0.bias"]))
    x = F.gelu(F.linear(x, weights["2.weight"], weights["2.bias"]))
    return scale * F.linear(x, weights["4.weight"], weights["4.bias"])


class _Inverter:
    """The token inverter the map is trained against: features -> the ``vocab_cap`` most frequent
    regular tokens of the device's data. :meth:`step` trains it on detached features and returns
    the mean entropy of its prediction on the live ones, for the map to raise."""

    def __init__(self, token_ids: torch.Tensor, rank: int, vocab_cap: int, lr: float):
        ids, counts = token_ids.unique(return_counts=True)
        keep = ids[counts.argsort(descending=True, stable=True)[:vocab_cap]]
        self.local = torch.full((int(token_ids.max()) + 1,), -1, dtype=torch.long)
        self.local[keep] = torch.arange(len(keep))
        self.net = nn.Sequential(nn.Linear(rank, 256), nn.GELU(), nn.Linear(256, len(keep)))
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr=lr)

    def targets(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.local[token_ids]

    def step(self, features: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        target = self.targets(token_ids)
        known = target >= 0
        if not known.any():  # only tokens outside the inverter's vocabulary: nothing to learn or raise
            return features.sum() * 0.0
        loss = F.cross_entropy(self.net(features[known].detach()), target[known])
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        log_p = self.net(features[known]).log_softmax(-1)
        return -(log_p.exp() * log_p).sum(-1).mean()


def fit_obfuscator(rows: list[torch.Tensor], ids: list[torch.Tensor], labels, *, rank: int, special_ids: torch.Tensor,
                   adversary_weight: float = 1.0, epochs: int = 4, lr: float = 1e-3, width: int = 256,
                   reader_width: int = 64, batch_size: int = 64, vocab_cap: int = 2000, seed: int = 0) -> Obfuscator:
    """Fit a rank-``rank`` obfuscator on a device's own data.

    ``rows[i]`` ``[n_i, d]``: the bottom's representations of sequence ``i`` (real tokens only, in
    order); ``ids[i]`` ``[n_i]``: its token ids; ``labels[i]``: its class. ``adversary_weight``:
    how much the map is pushed to raise the inverter's entropy (0: a plain label map). The same
    inputs and ``seed`` give the same obfuscator.
    """
    if not (isinstance(adversary_weight, (int, float)) and math.isfinite(adversary_weight) and adversary_weight >= 0):
        raise ValueError(f"adversary_weight={adversary_weight!r} is outside the accepted range: a finite number >= 0")
    for name, value in (("epochs", epochs), ("width", width), ("batch_size", batch_size), ("vocab_cap", vocab_cap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is outside the accepted range: an integer >= 1")
    stats = device_tokens("fit_obfuscator", rows, ids, labels, rank=rank, special_ids=special_ids)
    labels, special_ids, center, scale = stats.labels, stats.special_ids, stats.center, stats.scale
    d = rows[0].shape[-1]
    max_len = max(len(r) for r in rows)

    def batch(index):
        hidden, tokens, mask = _pad([rows[i] for i in index], [ids[i] for i in index])
        return (hidden - center) / scale, tokens, mask, mask.bool() & ~torch.isin(tokens, special_ids)

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # initialisation and dropout follow the seed, not the caller's RNG
        torch.manual_seed(seed)
        net = _network(d, rank, width)
        reader = _Reader(rank, int(labels.max()) + 1, reader_width, max_len)
        optimiser = torch.optim.Adam([*net.parameters(), *reader.parameters()], lr=lr)
        inverter = _Inverter(stats.tokens[stats.regular], rank, vocab_cap, lr) if adversary_weight > 0 else None
        net.train()
        reader.train()
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                b = order[start:start + batch_size]
                x, tokens, mask, regular = batch(b)
                f = net(x) * regular.unsqueeze(-1)
                loss = F.cross_entropy(reader(f, mask), labels[b])
                if inverter is not None and regular.any():
                    loss = loss - adversary_weight * inverter.step(f[regular], tokens[regular])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        net.eval()
        reader.eval()
        correct, coords, classes = 0, [], []
        hits = seen = 0
        with torch.no_grad():
            for start in range(0, len(rows), 256):
                b = list(range(start, min(start + 256, len(rows))))
                x, tokens, mask, regular = batch(b)
                f = net(x) * regular.unsqueeze(-1)
                correct += int((reader(f, mask).argmax(-1) == labels[b]).sum())
                coords.append(f[regular])
                classes.append(labels[b].unsqueeze(1).expand_as(regular)[regular])
                if inverter is not None:
                    target = inverter.targets(tokens[regular])
                    hits += int((inverter.net(f[regular]).argmax(-1) == target).sum())
                    seen += int(regular.sum())
    # the data-fixed frame and size, folded into the last layer: u' = a (u - mean) @ R, with one
    # factor a that gives the features the hidden's mean per-dimension variance
    coords = torch.cat(coords).double()
    mean, rotation = aligning_rotation(coords, torch.cat(classes))
    spread = float(coords.var(0).mean().sqrt()) * scale  # the features' size in release units, before a
    factor = scale / spread if spread > 0 else 1.0
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    last_w, last_b = weights["4.weight"].double(), weights["4.bias"].double()
    weights["4.weight"] = (factor * rotation.T @ last_w).float()
    weights["4.bias"] = (factor * rotation.T @ (last_b - mean)).float()
    return Obfuscator(center=center, scale=scale, weights=weights, lift=public_lift(d, rank),
                      special_ids=stats.present, special=stats.special,
                      reader_accuracy=correct / len(rows), inverter_accuracy=hits / seen if seen else 0.0,
                      fitted_spread=spread)
