"""The cloud half of split fine-tuning: the top model, its LoRA optimiser, training and evaluation.

:class:`CloudSide` is what the strategy (:mod:`strategies.split_learning`) drives in a Flower run,
and :class:`MiddleSide` the u-shaped strategy. The experiments' in-process training loops over the
same two classes (the centralised baseline, the privacy-utility sweep) are in
``simulations/training.py``. The cloud sees only what a device releases: representations, the
attention mask and (vanilla protocol) labels.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import SplitModel
from .tasks import classification_metrics

log = logging.getLogger(__name__)


# Sequences per forward when the cloud scores (or, u-shaped, forwards without training) a reply:
# a reply of any accepted size then costs one chunk's activations at a time.
EVAL_CHUNK = 64


class NonFiniteUpdate(RuntimeError):
    """Training on a release gave non-finite values; its updates were undone."""


class _BadBatch(RuntimeError):
    def __init__(self, release: int, why: str):
        super().__init__(why)
        self.release = release


class CloudSide:
    """The cloud's top model and optimiser (LoRA weights and the task head only)."""

    def __init__(self, split: SplitModel, *, learning_rate: float, batch_size: int, seed: int = 0):
        self.split = split
        self.batch_size = batch_size
        self.params = [p for p in split.top.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the top model has no trainable weights")
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def train_on(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
                 max_grad_norm: float | None = None) -> list[float]:
        """One optimiser step per batch of ``batch_size`` sequences, in order; returns batch losses.

        ``max_grad_norm``: each batch's gradient (of all trainable weights together) is clipped to
        this norm before its step, which bounds what one device's release can do to one step (the
        strategy passes the run config's ``train.max-grad-norm``; a device's round is ``train.batches-per-round``
        such steps).

        All or nothing: if any step gives a non-finite loss or non-finite weights, every update from
        this call is undone (weights, optimiser state and step count) and :class:`NonFiniteUpdate`
        is raised, so a poisoned release never reaches the LoRA weights.
        """
        losses, dropped = self.train_round([(hidden, mask, labels)], max_grad_norm=max_grad_norm)
        if dropped:
            raise NonFiniteUpdate(dropped[0])
        return losses

    def train_round(self, releases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                    max_grad_norm: float | None = None) -> tuple[list[float], dict[int, str]]:
        """One round on several devices' releases ``(hidden, mask, labels)``, their batches interleaved.

        Batch ``b`` of every release is stepped on before batch ``b + 1`` of any, in the order
        given. Stepping through one release after another would end each round on the last
        device's share: with label-skewed shares (a Dirichlet partition) the top then predicts that
        device's class for every input. Each step is still one device's batch, clipped to
        ``max_grad_norm`` (see :meth:`train_on`).

        All or nothing per release: if a step on a release's batch gives a non-finite loss or
        non-finite weights, the whole round is undone and replayed without that release (with the
        same dropout draws), so a rejected release never reaches the weights and the round ends
        where it would have ended without it. Returns the batch losses and
        ``{index of a rejected release: why}``.
        """
        self.split.top.train()
        start, rng = self.snapshot(), torch.get_rng_state()  # the replay draws the same dropout masks
        dropped: dict[int, str] = {}
        while True:
            try:
                return self._interleaved(releases, dropped, max_grad_norm), dropped
            except _BadBatch as bad:
                self.restore(start)
                torch.set_rng_state(rng)
                dropped[bad.release] = str(bad)
                if len(dropped) == len(releases):
                    return [], dropped

    def _interleaved(self, releases, dropped: dict[int, str], max_grad_norm: float | None) -> list[float]:
        losses = []
        longest = max((len(labels) for _, _, labels in releases), default=0)
        for i in range(0, longest, self.batch_size):
            for r, (hidden, mask, labels) in enumerate(releases):
                if r in dropped or i >= len(labels):
                    continue
                losses.append(self._step(hidden[i : i + self.batch_size], mask[i : i + self.batch_size],
                                         labels[i : i + self.batch_size], max_grad_norm, r, i // self.batch_size,
                                         len(losses)))
        return losses

    def _step(self, h, m, y, max_grad_norm, release: int, batch: int, done: int) -> float:
        if self.split.family == "encoder":  # right padding: drop all-pad columns
            width = int(m.sum(1).max())
            h, m = h[:, :width], m[:, :width]
        loss = F.cross_entropy(self.split.top(h, m), y)
        if not torch.isfinite(loss):
            raise _BadBatch(release, f"batch {batch} gave a non-finite loss ({float(loss.detach())}); "
                                     f"the {done} updates before it were undone")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        if not all(torch.isfinite(p).all() for p in self.params):
            raise _BadBatch(release, f"batch {batch} left non-finite weights; the {done + 1} updates up to it were undone")
        return float(loss.detach())

    def snapshot(self) -> dict:
        """A copy of everything training changes (trainable weights, optimiser state, step count)."""
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "steps": self.steps}

    def restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, snapshot["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.steps = snapshot["steps"]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, mask: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
        """The top's logits ``[N, C]`` for ``hidden [N, T, d]``, ``chunk`` sequences at a time, so
        the activations of one forward are bounded by the chunk, not by the reply's size."""
        self.split.top.eval()
        out = []
        for i in range(0, hidden.shape[0], chunk):
            h, m = hidden[i : i + chunk], mask[i : i + chunk]
            if self.split.family == "encoder":  # right padding: all-pad columns change nothing, cost time
                width = int(m.sum(1).max())
                h, m = h[:, :width], m[:, :width]
            out.append(self.split.top(h, m))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return classification_metrics(self.logits(hidden, mask), labels, self.split.num_labels)

    def state(self) -> dict:
        return {"trainable": self.split.trainable_state(), "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint

    def load(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self.split.load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


def clip_norm(grads: list[torch.Tensor | None], max_norm: float) -> list[torch.Tensor | None]:
    """``grads`` scaled down so that their joint norm is at most ``max_norm`` (non-finite ones are
    left as they are: :meth:`MiddleSide.apply` and :meth:`MiddleSide.step` refuse them)."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in present)))
    if not math.isfinite(norm) or norm <= max_norm:
        return grads
    factor = max_norm / norm
    return [None if g is None else g * factor for g in grads]


class MiddleSide:
    """The cloud's half of the u-shaped protocol: the middle and its LoRA optimiser.

    One step: :meth:`forward` each device's release (the graph is kept under a step key), send the
    outputs, receive each device's gradient of its loss with respect to them, :meth:`backward`
    each, then :meth:`step` once. A gradient that does not match what was sent, a stale key, or a
    device that never answers is dropped with its graph (:meth:`drop`), so no autograd graph
    outlives its step. The cloud never sees labels or a loss input.
    """

    def __init__(self, split: SplitModel, *, learning_rate: float):
        if split.middle is None:
            raise ValueError("MiddleSide needs a u-shaped split (load_split(..., protocol='u-shaped'))")
        self.split = split
        self.params = [p for p in split.middle.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate) if self.params else None
        self.pending: dict[str, torch.Tensor] = {}
        self.steps = 0

    def forward(self, key: str, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        """The middle's outputs ``[N, T, d]`` for one release (detached, to be sent)."""
        self.split.middle.train(train)
        if not train:  # no graph to keep: chunked, so one forward's activations stay bounded
            with torch.no_grad():
                return torch.cat([self.split.middle(hidden[i : i + EVAL_CHUNK], mask[i : i + EVAL_CHUNK])
                                  for i in range(0, hidden.shape[0], EVAL_CHUNK)])
        outputs = self.split.middle(hidden, mask)
        self.pending[key] = outputs
        return outputs.detach()

    def _take(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """The pending outputs of ``key`` (their graph leaves ``pending`` whatever happens), once
        ``grad`` is checked against them."""
        outputs = self.pending.pop(key, None)
        if outputs is None:
            raise KeyError(f"no pending outputs for step {key!r} (stale or unknown)")
        if tuple(grad.shape) != tuple(outputs.shape):
            raise ValueError(f"gradient has shape {tuple(grad.shape)}; the outputs sent were {tuple(outputs.shape)}")
        if not torch.isfinite(grad).all():
            raise ValueError("gradient holds non-finite values")
        return outputs

    def backward(self, key: str, grad: torch.Tensor, weight: float = 1.0, *, max_norm: float | None = None) -> None:
        """Back-propagate one device's gradient (scaled by ``weight``) into the LoRA weights.

        ``max_norm``: the device's gradient of the LoRA weights (all of them together) is first
        clipped to this norm, so one device adds at most ``weight * max_norm`` to the step, whatever
        it sends back (the strategy passes ``train.max-grad-norm``; the vanilla top clips each batch)."""
        if not max_norm:
            outputs = self._take(key, grad)
            outputs.backward(grad.to(outputs.dtype) * weight)
            return
        for p, g in zip(self.params, self.gradients(key, grad, max_norm=max_norm)):
            if g is not None:
                p.grad = g * weight if p.grad is None else p.grad + g * weight

    def gradients(self, key: str, grad: torch.Tensor, *, max_norm: float | None = None) -> list[torch.Tensor | None]:
        """One device's gradient of the LoRA weights, kept apart (for :meth:`apply`), clipped to
        ``max_norm`` (all weights together) if given."""
        outputs = self._take(key, grad)
        grads = list(torch.autograd.grad(outputs, self.params, grad.to(outputs.dtype), allow_unused=True))
        return clip_norm(grads, max_norm) if max_norm else grads

    def apply(self, grads: list[torch.Tensor | None]) -> bool:
        """One optimiser step with ``grads`` (from :meth:`gradients`); False, nothing changed, if
        they are non-finite or empty."""
        if any(g is not None and not torch.isfinite(g).all() for g in grads) or all(g is None for g in grads):
            return False
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return True

    def drop(self, key: str) -> None:
        self.pending.pop(key, None)

    def step(self, scale: float = 1.0) -> bool:
        """Apply the accumulated gradients (times ``scale``); False (and nothing changed) if there
        were none or they were non-finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return False
        if scale != 1.0:
            for g in grads:
                g.mul_(scale)
        if not all(torch.isfinite(g).all() for g in grads):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return True

    def state(self) -> dict:
        return {"trainable": self.split.trainable_state(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else {}, "steps": self.steps}
