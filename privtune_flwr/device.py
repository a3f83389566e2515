"""The device half of split fine-tuning: private text in, a defended release out.

:class:`DeviceSide` is the one release pipeline of the project. The Flower ClientApp, the
in-process baselines, the privacy-utility sweep, the substitution experiments and every attack
release through :meth:`DeviceSide.release`, so each attack number measures exactly what a device
sends.

Release once, bit for bit: an example's noise is a pure function of the device key, the mechanism
configuration and its tokens (:mod:`privtune_flwr.mechanism.noise_key`), and its representation
must be too. Floating-point results of the bottom depend on the padded width of the batch, so the
device pads each example to a width that depends only on its own length (the next multiple of
``bucket``, at most ``max_length``) and runs the bottom and the defence on one example per call
(``ROWS_PER_CALL``). The same example then gives the bit-identical release in any batch, epoch,
round or evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import registry
from .defenses import Defense, build_defense
from .registry import LABEL_DEFENSES
from .mechanism.obfuscator import Obfuscator, fit_obfuscator
from .mechanism.subspace import Subspace, fit_subspace
from .models import SplitModel
from .tasks import classification_metrics, next_token_nll, task_loss

BUCKET = 8
# Examples per call of the bottom and the defence. A float32 matrix product may round a row
# differently with the number of rows it is computed with (the BLAS picks its kernel by size): on
# an AVX-512 machine a 3-token sentence came out 1e-6 apart alone and beside two others of its
# width, which broke release-once's bit-identical re-sends there. One example per call gives every
# example the same shapes whatever batch it is in, at a cost measured by
# ``python -m simulations.bench_release_batching``.
ROWS_PER_CALL = 1


@dataclass
class DeviceRelease:
    """One release. ``hidden`` ``[N, T, d]`` (zero at padding), ``attention_mask`` ``[N, T]`` and
    ``labels`` ``[N]`` may travel; ``input_ids`` ``[N, T]`` is the device's own answer key (for its
    self-audit and for evaluating attacks) and is never put into a message; ``metrics`` hold only
    public numbers (counts, timings, the configuration's public bounds, the self-audit rate)."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    metrics: dict[str, float]
    input_ids: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]


def device_defense(name: str, split: SplitModel, *, epsilon: float | None, texts, labels, task: str = "classification",
                   max_length: int = 64, fit_seed: int = 0, **options) -> Defense:
    """Build defence ``name`` as a device does, from the device's own ``texts``/``labels`` (which
    never leave it): PrivTune's token importance, the label subspace of ``label-subspace`` or the
    network of ``label-obfuscator`` (fitted once with ``fit_seed``). ``options`` go to
    ``build_defense`` (``key``/``seed``/``release`` included)."""
    if name.startswith("privtune"):
        ids = [split.tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        options["importance"] = {"sequences": ids, "labels": None if labels is None else list(labels), "task": task}
    if name in LABEL_DEFENSES:
        if labels is None or task != "classification":
            raise ValueError(f"defense={name!r} is fitted on labelled classification data; got task={task!r}"
                             + (" without labels" if labels is None else ""))
        defaults = registry.get(name).defaults()
        rank = options.get("subspace_rank", defaults.subspace_rank)
        method = options.pop("subspace_fit", getattr(defaults, "subspace_fit", "reader"))
        if name == "label-subspace" and options.get("subspace") is not None:
            pass  # the federation's map, derived by this device from the aggregate (federated_map)
        elif name == "label-subspace":
            options["subspace"] = device_subspace(split, texts, labels, rank=rank, max_length=max_length, seed=fit_seed,
                                                  method=method)
        elif method != "reader":
            raise ValueError(f"subspace_fit={method!r} applies to label-subspace only; label-obfuscator trains its network")
        else:
            options["obfuscator"] = device_obfuscator(split, texts, labels, rank=rank, max_length=max_length,
                                                      seed=fit_seed)
    return build_defense(name, epsilon=None if name == "none" else epsilon, split=split, **options)


def _clean_rows(split: SplitModel, texts, labels, *, max_length: int, chunk: int):
    """The bottom's representations of ``texts`` (real tokens only, computed exactly as a release
    computes them, before any defence) and their token ids, one row per text."""
    texts, labels = list(texts), list(labels)
    if not texts or len(texts) != len(labels):
        raise ValueError(f"the device's fit needs texts and as many labels (got {len(texts)} texts, {len(labels)} labels)")
    clean = DeviceSide(split, build_defense("none", split=split), max_length=max_length, audit_tokens=0)
    rows, ids = [], []
    for start in range(0, len(texts), chunk):
        rel = clean.release(texts[start:start + chunk])
        for hidden, tokens, mask in zip(rel.hidden, rel.input_ids, rel.attention_mask):
            rows.append(hidden[mask.bool()])
            ids.append(tokens[mask.bool()])
    return rows, ids, labels


def device_subspace(split: SplitModel, texts, labels, *, rank: int, max_length: int = 64, seed: int = 0,
                    chunk: int = 256, method: str = "reader") -> Subspace:
    """The label subspace a device fits on its own data: the bottom's representations of ``texts``
    and their ``labels`` (``method``: see :func:`~privtune_flwr.mechanism.subspace.fit_subspace`)."""
    rows, ids, labels = _clean_rows(split, texts, labels, max_length=max_length, chunk=chunk)
    return fit_subspace(rows, ids, labels, rank=rank, special_ids=split.special_ids, seed=seed, method=method)


def device_obfuscator(split: SplitModel, texts, labels, *, rank: int, max_length: int = 64, seed: int = 0,
                      chunk: int = 256, **fit_options) -> Obfuscator:
    """The label obfuscator a device fits on its own data (see
    :func:`~privtune_flwr.mechanism.obfuscator.fit_obfuscator` for ``fit_options``)."""
    rows, ids, labels = _clean_rows(split, texts, labels, max_length=max_length, chunk=chunk)
    return fit_obfuscator(rows, ids, labels, rank=rank, special_ids=split.special_ids, seed=seed, **fit_options)


class DeviceSide:
    """What a device computes: tokenise, run the frozen bottom, apply the defence, self-audit."""

    def __init__(self, split: SplitModel, defense: Defense, *, max_length: int, audit_tokens: int = 512,
                 anchors: torch.Tensor | None = None, bucket: int = BUCKET, chunk: int = ROWS_PER_CALL):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be an integer >= 2")
        if not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket={bucket!r} must be an integer >= 1")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be an integer >= 1 (examples per call of the bottom; 1 keeps "
                             "re-sends bit-identical on any machine, see ROWS_PER_CALL)")
        self.split = split
        self.defense = defense
        self.max_length = max_length
        self.audit_tokens = audit_tokens
        self.anchors = anchors
        self.bucket = bucket
        self.chunk = chunk
        # seconds one release may run (the device policy's max-instruction-seconds); None = no limit
        self.time_limit: float | None = None

    def width(self, length: int) -> int:
        """The padded width of an example of ``length`` tokens: a function of its length only."""
        return min(self.max_length, -(-length // self.bucket) * self.bucket)

    def encode(self, texts) -> list[list[int]]:
        """Token ids of ``texts`` as the device releases them (special tokens, truncation)."""
        texts = list(texts)
        if not texts:
            raise ValueError("release needs at least one text")
        return self.split.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    @torch.no_grad()
    def release(self, texts, labels=None) -> DeviceRelease:
        """Release ``texts`` (and pass ``labels`` along, for the vanilla protocol)."""
        return self.release_ids(self.encode(texts), labels)

    @torch.no_grad()
    def release_ids(self, encoded: list[list[int]], labels=None) -> DeviceRelease:
        """Release already tokenised sequences (each at most ``max_length`` ids)."""
        encoded = [list(e) for e in encoded]
        if not encoded:
            raise ValueError("release needs at least one text")
        if labels is not None and len(labels) != len(encoded):
            raise ValueError(f"{len(labels)} labels for {len(encoded)} texts")
        if max(len(e) for e in encoded) > self.max_length:
            raise ValueError(f"a sequence holds {max(len(e) for e in encoded)} ids; max_length is {self.max_length}")
        tok = self.split.tokenizer
        lengths = [len(e) for e in encoded]
        if min(lengths) == 0:
            raise ValueError("a text tokenised to no tokens at all")
        n, t, d = len(encoded), max(lengths), self.split.hidden_size
        left = getattr(tok, "padding_side", "right") == "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        hidden = torch.zeros(n, t, d)
        ids = torch.full((n, t), pad, dtype=torch.long)
        mask = torch.zeros(n, t, dtype=torch.long)
        groups: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            groups.setdefault(self.width(length), []).append(i)
        bottom_s = defense_s = 0.0
        started = time.monotonic()
        for w in sorted(groups):
            members = groups[w]
            for start in range(0, len(members), self.chunk):
                if self.time_limit is not None and time.monotonic() - started > self.time_limit:
                    raise TimeoutError(f"this release of {n} examples ran past {self.time_limit!r} s and was stopped before "
                                       "anything was sent (node config 'max-instruction-seconds')")
                rows = members[start:start + self.chunk]
                g_ids = torch.full((len(rows), w), pad, dtype=torch.long)
                g_mask = torch.zeros(len(rows), w, dtype=torch.long)
                for r, i in enumerate(rows):
                    seq = torch.tensor(encoded[i], dtype=torch.long)
                    span = slice(w - len(seq), w) if left else slice(0, len(seq))
                    g_ids[r, span], g_mask[r, span] = seq, 1
                t0 = time.perf_counter()
                h = self.split.bottom(g_ids, g_mask)
                t1 = time.perf_counter()
                released = self.defense(h, g_ids, g_mask).float()
                defense_s += time.perf_counter() - t1
                bottom_s += t1 - t0
                keep = min(w, t)  # padding columns beyond the batch's longest example are all zero
                index = torch.tensor(rows)
                src, dst = (slice(w - keep, w), slice(t - keep, t)) if left else (slice(0, keep), slice(0, keep))
                hidden[index, dst] = released[:, src]
                ids[index, dst] = g_ids[:, src]
                mask[index, dst] = g_mask[:, src]
        metrics = {
            "num-examples": float(n),
            "num-tokens": float(sum(lengths)),
            "bottom-seconds": bottom_s,
            "defense-seconds": defense_s,
            "bytes-sent": float(hidden.numel() * 4 + mask.numel() + (n * 8 if labels is not None else 0)),
        }
        metrics.update(self.defense.statement().reply_metrics(lengths))
        audit = self.self_audit(hidden, ids, mask)
        if audit is not None:
            metrics["self-audit-knn"] = audit
        out_labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
        return DeviceRelease(hidden, mask, out_labels, metrics, ids)

    def self_audit(self, released: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float | None:
        """KNN top-1 token recovery on (a sample of) this release's real tokens.

        One aggregate rate per reply. What it tells the cloud: how often nearest-anchor decoding,
        which the cloud can run itself, is right on this batch; not which tokens it got right.
        """
        if self.audit_tokens == 0 or self.anchors is None:
            return None
        from .mechanism.anchors import real_token_mask, self_audit

        rows, cols = real_token_mask(ids, mask, self.split.special_ids).nonzero(as_tuple=True)
        if len(rows) == 0:
            return None
        if len(rows) > self.audit_tokens:  # bounded cost per release: V x audit_tokens scores
            # Which tokens are scored comes from the device's key (keyed by the batch's tokens), so
            # the cloud cannot know the positions a rate is about; the same batch, the same sample.
            key = getattr(self.defense, "key", None)
            if key is None:
                from .mechanism.noise_key import NoiseKey

                key = NoiseKey.fresh()
            order = key.stream(b"self-audit-sample", ids[rows, cols].tolist()).numpy.permutation(len(rows))
            pick = torch.from_numpy(order[: self.audit_tokens])
            rows, cols = rows[pick], cols[pick]
        ones = torch.ones(1, len(rows), dtype=torch.long)
        return self_audit(released[rows, cols][None], ids[rows, cols][None], ones, self.anchors, self.split.special_ids)


# The largest coordinate a device accepts in the cloud's outputs, where the model gives no tighter
# one: the same public cap the cloud puts on a device's release (schema.Plan.max_abs). Honest
# middles stay far below it (largest coordinate over a batch of sentences: 5,972 for SmolLM2-135M's
# residual stream, which reaches the head before any norm), and inside it the head's float32
# arithmetic cannot overflow: a decoder head's final norm sums d squares (<= d * 1e12).
HEAD_INPUT_MAX_ABS = 1e6


def head_input_bound(split: SplitModel) -> float:
    """The public range of the cloud's outputs for ``split``'s head: ``|value| <= bound`` per
    coordinate, from public facts only.

    * Encoders: the middle's last block ends in LayerNorm, so no input of any kind makes an
      honest middle output more than :attr:`~privtune_flwr.models.SplitModel.middle_output_bound`
      (its weights' ``max |gamma| * sqrt(d - 1) + |beta|``; MiniLM split after block 3: about 20,
      honest outputs reach 6).
    * Decoders: the residual stream has no such bound and the head's final norm is
      scale-invariant; the bound is the float32 range of its first reduction (``d * bound**2``
      far inside float32), capped at :data:`HEAD_INPUT_MAX_ABS`."""
    d = int(split.hidden_size)
    headroom = math.sqrt(torch.finfo(torch.float32).max / max(d, 1)) / 1e6
    bound = min(HEAD_INPUT_MAX_ABS, headroom)
    derived = getattr(split, "middle_output_bound", None)
    return min(bound, derived) if derived else bound


class DeviceHead:
    """The device's half of the u-shaped protocol: its head, its optimiser, its labels and loss.

    :meth:`step` takes the middle's outputs for a batch the device released, computes the loss on
    its own labels (classification) or its own next tokens (generation), updates the head, and
    returns the gradient of the loss with respect to the outputs: the one thing that goes back.
    Outputs outside the head's public range (:attr:`max_abs`, non-finite values) are refused
    before the head or its optimiser is touched.
    """

    def __init__(self, split: SplitModel, *, learning_rate: float):
        if split.head is None:
            raise ValueError("DeviceHead needs a u-shaped split (load_split(..., protocol='u-shaped'))")
        self.split = split
        self.max_abs = head_input_bound(split)
        self.learning_rate = learning_rate
        self.named = {k: p for k, p in split.head.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate) if self.params else None
        self.initial = {k: p.detach().clone() for k, p in self.named.items()}
        self.steps = 0

    def dump(self) -> dict:
        """The head's trainable weights and its optimiser state, as flat tensors (for storage)."""
        optimizer = {}
        if self.optimizer is not None:
            for i, state in self.optimizer.state_dict()["state"].items():
                for name, value in state.items():
                    optimizer[f"{i}.{name}"] = torch.as_tensor(value).detach().clone()
        return {"weights": {k: p.detach().clone() for k, p in self.named.items()}, "optimizer": optimizer}

    def load(self, state: dict) -> None:
        """Restore :meth:`dump` (``optimizer`` None: a fresh optimiser)."""
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(state["weights"][k])
        self.optimizer = torch.optim.AdamW(self.params, lr=self.learning_rate) if self.params else None
        if state.get("optimizer") and self.optimizer is not None:
            saved = {}
            for key, value in state["optimizer"].items():
                i, name = key.split(".", 1)
                saved.setdefault(int(i), {})[name] = value
            template = self.optimizer.state_dict()
            template["state"] = saved
            self.optimizer.load_state_dict(template)

    def check_outputs(self, outputs: torch.Tensor) -> None:
        """Refuse cloud outputs ``[N, T, d]`` (float) outside the head's public range: any
        non-finite value, or a coordinate beyond ``max_abs``. Raises ValueError naming both."""
        accepted = f"finite values with |value| <= {self.max_abs:g} (the head's public input range, d={self.split.hidden_size})"
        bad = ~torch.isfinite(outputs)
        if bad.any():
            raise ValueError(f"the cloud's outputs hold {int(bad.sum())} non-finite values (first: "
                             f"{float(outputs[bad][0])}); accepted: {accepted}")
        largest = float(outputs.abs().max()) if outputs.numel() else 0.0
        if largest > self.max_abs:
            raise ValueError(f"the cloud's outputs hold values up to {largest:.4g}; accepted: {accepted}")

    def step(self, outputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, *,
             token_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, float]:
        """One head step; returns the gradient w.r.t. ``outputs`` as it is sent (after the device's
        label protection, :attr:`protection`, if any: randomised labels for the loss, noise on the
        gradient) and the loss. ``token_ids`` identify the examples (randomised response draws
        each example's label once)."""
        self.check_outputs(outputs)  # before the head, its optimiser or its step count is touched
        protection = getattr(self, "protection", None)
        if protection is not None and self.split.task == "classification":
            targets = protection.randomise_labels(targets, token_ids)
        outputs = outputs.detach().clone().requires_grad_(True)
        self.split.head.train()
        loss = task_loss(self.split.head(outputs, mask), mask, targets, self.split.task)
        if not torch.isfinite(loss):
            raise ValueError(f"the head's loss is {float(loss)}: the outputs it was sent are unusable")
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.steps += 1
        grad = outputs.grad.detach()
        if protection is not None:
            grad = protection.protect_gradient(grad, targets if self.split.task == "classification" else None, mask)
        return grad, float(loss.detach())

    @torch.no_grad()
    def evaluate(self, outputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        self.check_outputs(outputs)
        self.split.head.eval()
        logits = self.split.head(outputs, mask)
        if self.split.task == "classification":
            return classification_metrics(logits, targets, self.split.num_labels)
        loss = float(task_loss(logits, mask, targets, "generation"))
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(loss))), "num-examples": float(len(targets))}


@torch.no_grad()
def next_token_loss_sum(head: DeviceHead, outputs: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of the head's logits on the middle's ``outputs`` over every
    real pair of positions, and the number of pairs (for a corpus perplexity)."""
    head.split.head.eval()
    return next_token_nll(head.split.head(outputs, mask), mask, ids)


def generated_text(tokenizer, seq: list[int], prompt_length: int) -> str:
    """The text a device generated after its prompt: decoded, up to the first line break."""
    return tokenizer.decode(seq[prompt_length:], skip_special_tokens=True).split("\n")[0].strip()


def mean_rouge_l(references: list[str], texts: list[str]) -> float:
    """Mean ROUGE-L F1 (stemmed) of generated ``texts`` against their ``references``."""
    from rouge_score import rouge_scorer

    if not texts or len(texts) != len(references):
        raise ValueError(f"{len(texts)} generated texts for {len(references)} references; need as many, at least one")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r.strip(), t)["rougeL"].fmeasure for r, t in zip(references, texts)) / len(texts)

