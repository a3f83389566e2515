"""The experiments' in-process training loops: one device, the cloud's top, no Flower.

They drive the product's :class:`~privtune_flwr.cloud.CloudSide` and
:class:`~privtune_flwr.cloud.MiddleSide` exactly as the strategies do, against one
:class:`~privtune_flwr.device.DeviceSide`: :func:`fine_tune` for a fixed number of steps (the
centralised baseline, the throughput benchmark), :func:`fine_tune_to_convergence` until a
validation split the device holds out stops improving (the privacy-utility sweep), and the
u-shaped equivalents. They are not part of the installed product.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from privtune_flwr.cloud import CloudSide, MiddleSide
from privtune_flwr.tasks import classification_metrics, next_token_nll

log = logging.getLogger(__name__)


def fine_tune(device, cloud: "CloudSide", train, steps: int, *, seed: int = 0, progress: bool = False) -> list[float]:
    """``steps`` cloud updates on batches released by one device holding ``train`` (a dataset
    with text/label columns), in seeded epoch order; returns the batch losses."""
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < steps * cloud.batch_size:
        epoch = list(range(len(train)))
        rng.shuffle(epoch)
        order += epoch
    losses: list[float] = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="fine-tuning", unit="step")
    for s in bar:
        rows = train.select(order[s * cloud.batch_size : (s + 1) * cloud.batch_size])
        rel = device.release(rows["text"], rows["label"])
        losses += cloud.train_on(rel.hidden, rel.attention_mask, rel.labels)
    return losses


# ------------------------------------------------------------------------------------------------
# Fine-tuning to convergence
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopRule:
    """When :func:`fine_tune_to_convergence` stops.

    The validation split is scored every ``eval_every`` optimiser steps. After ``patience`` scores
    in a row without a new best, the top goes back to its best weights and, ``decays`` times, the
    learning rate is multiplied by ``decay_factor`` and training goes on; the next time it stops.
    It also stops at ``max_steps``. The top ends at the weights of its best validation score.
    """

    patience: int = 4
    eval_every: int = 100
    max_steps: int = 4000
    decays: int = 0
    decay_factor: float = 0.3

    def __post_init__(self):
        for name, low in (("patience", 1), ("eval_every", 1), ("max_steps", 1), ("decays", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is outside the accepted range: an integer >= {low}")
        factor = self.decay_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise ValueError(f"decay_factor={factor!r} is outside the accepted range: (0, 1)")


class ReleasedSet:
    """A device's examples released once, kept per example (trimmed of padding).

    Release once makes a re-sent example the bit-identical tensor, so releasing each example one
    time and reusing it over epochs is exactly what the cloud would receive round after round.
    """

    def __init__(self, device, texts, labels=None, *, chunk: int = 256):
        """``labels`` None (generation): each example's targets are its own token ids, kept with it."""
        texts = list(texts)
        labels = None if labels is None else list(labels)
        if not texts:
            raise ValueError("texts=[] is empty; a released set needs at least one example")
        self.left = getattr(device.split.tokenizer, "padding_side", "right") == "left"
        self.rows: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] | None = [] if labels is None else None
        self.metrics: dict[str, float] = {}
        for start in range(0, len(texts), chunk):
            rel = device.release(texts[start:start + chunk], None if labels is None else labels[start:start + chunk])
            for hidden, mask, ids in zip(rel.hidden, rel.attention_mask, rel.input_ids):
                self.rows.append(hidden[mask.bool()].clone())
                if self.ids is not None:
                    self.ids.append(ids[mask.bool()].clone())
            for k, v in rel.metrics.items():
                if k.endswith("seconds") or k.startswith("num-") or k == "bytes-sent":
                    self.metrics[k] = self.metrics.get(k, 0.0) + float(v)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.lengths = torch.tensor([len(r) for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [b, T, d]`` (zero padding on the tokenizer's side), ``mask [b, T]`` and the
        targets: ``labels [b]``, or (generation) the token ids ``[b, T]`` laid out like ``hidden``."""
        index = [int(i) for i in index]
        width = int(max(self.lengths[i] for i in index))
        d = self.rows[index[0]].shape[-1]
        hidden = torch.zeros(len(index), width, d)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        ids = torch.zeros(len(index), width, dtype=torch.long) if self.ids is not None else None
        for r, i in enumerate(index):
            n = len(self.rows[i])
            span = slice(width - n, width) if self.left else slice(0, n)
            hidden[r, span], mask[r, span] = self.rows[i], 1
            if ids is not None:
                ids[r, span] = self.ids[i]
        return hidden, mask, (self.labels[index] if ids is None else ids)


def bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator, pool: int = 32) -> list[list[int]]:
    """One epoch of batches: a seeded shuffle, sorted by length within pools of ``pool`` batches
    (so a batch pads little), then the batches shuffled again. Every example appears once."""
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[list[int]] = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


@torch.no_grad()
def evaluate_set(cloud: CloudSide, released: ReleasedSet, batch_size: int = 64) -> dict[str, float]:
    """:func:`classification_metrics` of the cloud's top on a released set (length-sorted batches)."""
    cloud.split.top.eval()
    order = torch.argsort(released.lengths, stable=True)
    logits = torch.empty(len(released), cloud.split.num_labels)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        hidden, mask, _ = released.batch(index)
        logits[index] = cloud.split.top(hidden, mask).float()
    return classification_metrics(logits, released.labels, cloud.split.num_labels)


def fine_tune_to_convergence(device, cloud: CloudSide, train, validation, rule: StopRule = StopRule(), *,
                             seed: int = 0, metric: str = "accuracy", progress: bool = False) -> dict:
    """Fine-tune the cloud's top on ``train`` until ``validation`` stops improving.

    ``train``/``validation``: datasets with ``text`` and ``label`` columns, both held by the device
    (the validation split is held out from its training data) and both released through it once.
    ``metric``: the validation score to maximise (``accuracy`` or ``macro-f1``). The top ends at the
    weights of its best validation score. Returns ``{"steps", "best_step", "best_validation",
    "stopped_by" ("patience" | "max-steps"), "decays" (learning-rate decays taken), "epochs",
    "history" [(step, score, loss)], "final_train_loss", "release_seconds"}``.
    """
    if metric not in ("accuracy", "macro-f1"):
        raise ValueError(f"metric={metric!r} is not accepted; accepted: accuracy, macro-f1")
    t0 = time.perf_counter()
    train_set = ReleasedSet(device, train["text"], train["label"])
    val_set = ReleasedSet(device, validation["text"], validation["label"])
    release_seconds = time.perf_counter() - t0

    def validate() -> tuple[float, float, float]:
        scores = evaluate_set(cloud, val_set)
        return scores[metric], scores[metric], scores["loss"]

    run = _to_convergence(train_set, cloud.batch_size, lambda index: cloud.train_on(*train_set.batch(index)), validate,
                          cloud.split.trainable_state, cloud.split.load_trainable_state, [cloud.optimizer], rule,
                          seed=seed, metric=metric, progress=progress)
    return {**run, "release_seconds": release_seconds, "validation_examples": len(val_set)}


def _to_convergence(train_set: ReleasedSet, batch_size: int, train_batch, validate, get_state, load_state, optimizers,
                    rule: StopRule, *, seed: int, metric: str, progress: bool) -> dict:
    """The loop of :class:`StopRule`: epochs of :func:`bucketed_batches` of ``train_set``, each
    batch through ``train_batch(index) -> losses``; every ``rule.eval_every`` steps
    ``validate() -> (score to maximise, score as reported, loss)``; the best weights
    (``get_state``/``load_state``) are kept and end the run; a decay multiplies every optimiser's
    learning rate."""
    generator = torch.Generator().manual_seed(seed)
    best, best_step, best_state, waited = -math.inf, 0, get_state(), 0
    best_reported = None
    history, losses, steps, stopped_by, decays = [], [], 0, "max-steps", 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rule.max_steps, desc="fine-tuning", unit="step")
    while steps < rule.max_steps and stopped_by != "patience":
        for index in bucketed_batches(train_set.lengths, batch_size, generator):
            losses += train_batch(index)
            steps += 1
            if bar is not None:
                bar.update(1)
            if steps % rule.eval_every == 0 or steps == rule.max_steps:
                score, reported, loss = validate()
                history.append((steps, reported, loss))
                if score > best:
                    best, best_reported, best_step, waited = score, reported, steps, 0
                    best_state = get_state()
                else:
                    waited += 1
                if bar is not None:
                    bar.set_postfix_str(f"val {metric} {reported:.3f} (best {best_reported:.3f} @ {best_step})")
                recent = losses[-rule.eval_every:]
                log.info("step %d/%d: validation %s %.4f, best %.4f at step %d, train loss %.4f", steps, rule.max_steps,
                         metric, reported, best_reported, best_step, sum(recent) / max(1, len(recent)))
                if waited >= rule.patience and decays < rule.decays:
                    decays, waited = decays + 1, 0
                    load_state(best_state)
                    for optimizer in optimizers:
                        for group in optimizer.param_groups:
                            group["lr"] *= rule.decay_factor
                elif waited >= rule.patience:
                    stopped_by = "patience"
                    break
            if steps >= rule.max_steps:
                break
    if bar is not None:
        bar.close()
    load_state(best_state)
    tail = losses[-50:]
    return {"steps": steps, "best_step": best_step, "best_validation": best_reported, "stopped_by": stopped_by,
            "decays": decays, "epochs": steps * batch_size / len(train_set), "history": history,
            "final_train_loss": sum(tail) / len(tail), "train_examples": len(train_set)}


# ------------------------------------------------------------------------------------------------
# The u-shaped protocol in one process (the privacy-utility sweep's generation points)
# ------------------------------------------------------------------------------------------------


def u_shaped_step(middle: MiddleSide, head, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                  key: str = "step") -> float:
    """One u-shaped training step as the Flower messages make it: the cloud's middle forwards the
    release, the device's head (:class:`~privtune_flwr.device.DeviceHead`) computes the loss on its
    own targets and returns the gradient with respect to the outputs, the cloud back-propagates."""
    outputs = middle.forward(key, hidden, mask)
    grad, loss = head.step(outputs, mask, targets)
    middle.backward(key, grad)
    middle.step()
    return loss


@torch.no_grad()
def u_shaped_perplexity(middle: MiddleSide, head, released: ReleasedSet, batch_size: int = 32) -> dict[str, float]:
    """Next-token loss and perplexity of ``head(middle(.))`` over every real token pair of a
    generation :class:`ReleasedSet` (token-weighted, as a corpus perplexity)."""
    order = torch.argsort(released.lengths, stable=True)
    total, count = 0.0, 0
    head.split.head.eval()
    for start in range(0, len(order), batch_size):
        hidden, mask, ids = released.batch(order[start:start + batch_size])
        logits = head.split.head(middle.forward("eval", hidden, mask, train=False), mask)
        loss_sum, pairs = next_token_nll(logits, mask, ids)
        total, count = total + loss_sum, count + pairs
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}


def fine_tune_u_shaped_to_convergence(device, middle: MiddleSide, head, train_texts, validation_texts,
                                      rule: StopRule = StopRule(), *, batch_size: int = 16, seed: int = 0,
                                      progress: bool = False) -> dict:
    """:func:`fine_tune_to_convergence` for generation on the u-shaped protocol: the cloud's middle
    and the device's head train together (:func:`u_shaped_step`) on releases of ``train_texts``
    (each its own target), until the perplexity of ``validation_texts`` stops improving; both end at
    their best weights. Returns the same keys, with ``best_validation`` a perplexity."""
    t0 = time.perf_counter()
    train_set = ReleasedSet(device, train_texts)
    val_set = ReleasedSet(device, validation_texts)
    release_seconds = time.perf_counter() - t0
    split = middle.split

    def validate() -> tuple[float, float, float]:
        scores = u_shaped_perplexity(middle, head, val_set)
        return -scores["loss"], scores["perplexity"], scores["loss"]

    def get_state() -> dict:
        return {"middle": split.trainable_state(), "head": split.head_state()}

    def load_state(state: dict) -> None:
        split.load_trainable_state(state["middle"])
        with torch.no_grad():
            for k, p in head.named.items():
                p.copy_(state["head"][k])

    optimizers = [o for o in (middle.optimizer, head.optimizer) if o is not None]
    run = _to_convergence(train_set, batch_size, lambda index: [u_shaped_step(middle, head, *train_set.batch(index))],
                          validate, get_state, load_state, optimizers, rule, seed=seed, metric="perplexity",
                          progress=progress)
    return {**run, "release_seconds": release_seconds, "validation_examples": len(val_set)}


@torch.no_grad()
def u_shaped_generate(device, middle: MiddleSide, head, prompts: list[list[int]], max_new_tokens: int,
                      batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations of tokenised ``prompts`` on the u-shaped protocol: at each new token the
    device releases the sequence so far (release once: the prefix's rows are the ones it already
    sent, the new token's row is keyed by the text up to it), the cloud's middle forwards it, and
    the device's head picks the next token from the last position. Returns prompt + continuation."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is outside the accepted range: >= 1")
    if device.split.family != "decoder" or device.split.task != "generation":
        raise ValueError(f"greedy generation needs a decoder language model; this split is a {device.split.family} "
                         f"for {device.split.task}")
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [list(p) for p in prompts[start:start + batch_size]]
        for _ in range(max_new_tokens):
            rel = device.release_ids(seqs)
            outputs = middle.forward("generate", rel.hidden, rel.attention_mask, train=False)
            last = outputs[:, -1:]  # decoders pad on the left: the last column is each sequence's end
            head.split.head.eval()
            logits = head.split.head(last, torch.ones(len(seqs), 1, dtype=torch.long))[:, -1]
            for seq, token in zip(seqs, logits.argmax(-1).tolist()):
                seq.append(int(token))
        out += seqs
    return out

