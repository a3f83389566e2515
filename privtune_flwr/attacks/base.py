"""What the cloud sees, and the fit-on-auxiliary / score-on-victim shape shared by every attack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..mechanism.anchors import real_token_mask as _real_tokens
from ..models import SplitModel


@dataclass
class Released:
    """Released representations of a set of texts, plus ground truth that only the evaluator holds.

    ``hidden``: ``[N, T, d]`` released representations (zero at padding);
    ``attention_mask``: ``[N, T]`` (the cloud receives it);
    ``input_ids``: ``[N, T]`` true tokens: never an input of an attack model, only its training
    target on *auxiliary* data and the answer key on victim data;
    ``attributes``: name -> ``[N]`` integer class ids per sequence (``-1`` = unknown, skipped).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    attributes: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.hidden.dim() != 3 or self.hidden.shape[0] == 0:
            raise ValueError(f"hidden has shape {tuple(self.hidden.shape)}; expected a non-empty [N, T, d]")
        n, t = self.hidden.shape[:2]
        for name in ("attention_mask", "input_ids"):
            if tuple(getattr(self, name).shape) != (n, t):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {(n, t)}")
        for name, value in self.attributes.items():
            if tuple(value.shape) != (n,):
                raise ValueError(f"attribute {name!r} has shape {tuple(value.shape)}; expected ({n},)")

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def subset(self, index: torch.Tensor) -> Released:
        return Released(
            self.hidden[index], self.attention_mask[index], self.input_ids[index],
            {k: v[index] for k, v in self.attributes.items()},
        )


@torch.no_grad()
def release(split: SplitModel, defense, texts, max_length: int = 64, batch_size: int = 32, attributes=None) -> Released:
    """What the cloud receives for ``texts``: the device pipeline itself
    (:meth:`privtune_flwr.device.DeviceSide.release`, bottom + ``defense``), with the true token
    ids kept beside it as the evaluator's answer key. Padding stays zero; with release once (the
    default) releasing the same texts again gives the same tensors.
    """
    from ..device import DeviceSide

    texts = list(texts)
    if not texts:
        raise ValueError("texts=[] is empty; release needs at least one text")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer >= 2")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    out = DeviceSide(split, defense, max_length=max_length, audit_tokens=0, chunk=batch_size).release(texts)
    attrs = {}
    for name, value in (attributes or {}).items():
        value = torch.as_tensor(value, dtype=torch.long)
        if tuple(value.shape) != (len(texts),):
            raise ValueError(f"attribute {name!r} has {tuple(value.shape)} values for {len(texts)} texts")
        attrs[name] = value
    return Released(out.hidden, out.attention_mask, out.input_ids, attrs)


def real_token_mask(released: Released, special_ids: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` bool: real (unpadded) tokens that are not special tokens, the ones scored."""
    return _real_tokens(released.input_ids, released.attention_mask, special_ids)


class Standardizer(nn.Module):
    """Per-feature standardisation fitted on auxiliary data only.

    Heavy d_chi noise scales the representations by orders of magnitude; standardising keeps
    the attack networks' optimisation well-conditioned at every ε (part of a strong attacker).
    """

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Attack:
    """An attack: ``fit(aux)`` sees auxiliary data only; ``score(victim)`` is inference only.

    The split keeps the no-victim-training rule visible in the code: ``score`` runs under
    ``torch.no_grad`` on a model in eval mode and never reads a victim label before predicting.
    """

    name = "base"
    defaults: dict[str, Any] = {}

    def __init__(self, split: SplitModel, *, seed: int = 0, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"attack {self.name!r} got unknown options {unknown}; accepted: {sorted(self.defaults)}")
        self.split = split
        self.seed = int(seed)
        self.options = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        self.special_ids = split.special_ids
        self.fitted = False

    def fit(self, aux: Released) -> Attack:
        raise NotImplementedError  # subclasses train on ``aux`` here

    def score(self, victim: Released) -> dict:
        raise NotImplementedError  # subclasses score ``victim`` here

    def parameters(self) -> dict[str, torch.Tensor]:
        """Everything the fitted attacker learned (for checks that scoring does not train)."""
        return {}

    def _require_fitted(self):
        if not self.fitted:
            raise ValueError(f"attack {self.name!r} must be fitted on auxiliary data before scoring")


def train_minibatch(model: nn.Module, inputs: tuple[torch.Tensor, ...], loss_fn, *, epochs: int, batch_size: int,
                    lr: float, seed: int, weight_decay: float = 0.0) -> list[float]:
    """Adam for a fixed number of epochs (no model selection on any test set); returns epoch losses."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be an integer >= 1")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = inputs[0].shape[0]
    history = []
    model.train()
    for _ in range(epochs):
        order, total = torch.randperm(n, generator=gen), 0.0
        for start in range(0, n, batch_size):
            batch = tuple(x[order[start:start + batch_size]] for x in inputs)
            loss = loss_fn(model, *batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch[0].shape[0]
        history.append(total / n)
    model.eval()
    return history
