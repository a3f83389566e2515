"""Run configuration: one typed object, validated once at the boundary.

``[tool.flwr.app.config]`` in ``pyproject.toml`` mirrors :class:`RunConfig` key for key (a test
checks this). The keys are grouped by concern (``model.split-layer``, ``defense.epsilon``: the
mapping to the field names is :mod:`privtune_flwr.keys`).
"""

from __future__ import annotations

import difflib
import json
import math
import threading
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from . import registry
from .keys import FIELDS, GROUPS, KEYS, RENAMED, key, renamed_message
from .registry import DEFENSE_NAMES, LABEL_DEFENSES, GaussianOptions, LabelSubspaceOptions, PrivTuneOptions
from .vocab import FIT_OPTIMIZERS, MAP_SCOPES, PARTITIONERS, SPLIT_PROTOCOLS, TASKS

if TYPE_CHECKING:
    from .accounting import PrivacyStatement

PROTOCOLS = (*SPLIT_PROTOCOLS, "offsite")
OFFSITE_METHODS = ("fedbiot", "scaleot")  # as privtune_flwr.offsite.METHODS (a test keeps them equal)
# Blocks of the offline models, so that an emulator that would drop every middle block (or none)
# is refused when the config is read; other models are checked when the emulator is built.
OFFSITE_DEPTHS = {"minilm": 6, "smollm2": 30}
LORA_TARGET_CHOICES = ("attention", "all")  # as privtune_flwr.models accepts them
RELEASES = ("once", "fresh")
TRANSPORT_DTYPES = ("float32", "float16")  # as privtune_flwr.schema accepts them
PLACEMENT_DEVICES = ("cpu", "cuda")  # as privtune_flwr.models.placement accepts them
PLACEMENT_DTYPES = ("float32", "bfloat16", "float16")
MIDDLE_STEPS = ("per-batch", "joint")
SUBSPACE_FITS = ("reader", "closed-form")  # as privtune_flwr.mechanism.subspace accepts them
# Keys that left the run config, and where their job went (a run config naming one is refused).
_FAULTS_MOVED = ("fault injection is a device-side Flower Mod now (simulations.faults), which tests and the faults "
                 "benchmark attach; the cloud's run config cannot make devices misbehave")
REMOVED_KEYS = {"fault-fraction": _FAULTS_MOVED, "fault-kinds": _FAULTS_MOVED, "fault-delay": _FAULTS_MOVED}
# u-shaped label protection on the device (privtune_flwr.label_protection.METHODS; a test keeps them equal).
LABEL_PROTECTIONS = ("none", "max-norm", "marvell", "randomised-response")


@dataclass(frozen=True)
class RunConfig:
    # model and split
    model: str = "minilm"
    split_layer: int = 3  # blocks on the device (3: see docs/privacy.md, "Why the default is label-subspace")
    task: str = "classification"
    num_labels: int = 2  # classes of a classification task (the cloud builds no head from data)
    max_length: int = 64
    # where each half runs (privtune_flwr.models.load_split): the bottom (and a u-shaped device's
    # head) on the devices, the cloud's top (vanilla) or middle (u-shaped) in the cloud. Devices:
    # cpu | cuda | cuda:<i>; dtypes of the frozen weights: float32 | bfloat16 | float16 (cuda only).
    # Trained weights stay float32 and the bottom's output is float32: noise is added in float32.
    bottom_device: str = "cpu"
    bottom_dtype: str = "float32"
    cloud_device: str = "cpu"
    cloud_dtype: str = "float32"
    # data and federation
    dataset: str = "rotten_tomatoes"
    test_fraction: float = 0.1
    max_examples: int = 0  # 0 = the whole dataset
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    num_rounds: int = 5
    devices_per_round: int = 5
    # Sampling waits until this many devices are connected, and a run goes on while this many
    # stay connected, so it is below the number of devices a federation starts with.
    min_devices: int = 5
    min_replies: int = 1  # a round goes on while at least this many valid replies arrive
    round_retries: int = 2  # a round short of federation.min-replies is retried this often, then the run fails
    resume_from: str = ""  # a run folder to resume from (its last complete checkpoint); "" = a new run
    batches_per_round: int = 8
    batch_size: int = 16
    eval_examples: int = 0  # per device and evaluation; 0 = its whole test split
    eval_devices: int = 0  # devices asked to evaluate each round; 0 = every connected device
    final_eval_all: bool = True  # with federation.eval-devices > 0: the last round still evaluates every device once
    reply_max_examples: int = 2048  # the most sequences the cloud reads from one evaluation reply
    # the dtype released representations travel in: "float32" or "float16" (half the bytes; the
    # noise is added in float32 before the rounding, so the privacy statement is unchanged)
    transport_dtype: str = "float32"
    protocol: str = "vanilla"  # "vanilla" (labels go to the cloud) | "u-shaped" (labels and loss stay on the device)
    # u-shaped: "per-batch" = one optimiser step of the middle per device batch, as the vanilla top
    # takes (the devices of one exchange are applied in turn, each gradient computed at the weights
    # the exchange started from); "joint" = one step per exchange, averaged over the devices
    middle_steps: str = "per-batch"
    # offsite (privtune_flwr.offsite; no representation leaves a device): "fedbiot" (uniform-stride
    # layer drop) | "scaleot" (importance-scored drop + SVD of the kept middle's attention weights).
    # The first and last offsite.adapter-layers blocks are the LoRA adapter; offsite.emulator-drop of the middle
    # blocks are dropped; offsite.distill-steps align the emulator on public text; each sampled device takes
    # offsite.local-steps steps of train.batch-size examples per round.
    offsite_method: str = "fedbiot"
    emulator_drop: float = 0.5
    offsite_adapter_layers: int = 1
    distill_steps: int = 20
    svd_rank_fraction: float = 0.25
    local_steps: int = 8
    generate_samples: int = 3  # generation: texts a device generates before and after fine-tuning (0 = none)
    max_new_tokens: int = 16  # generation: the longest generated continuation
    # cloud fine-tuning
    lora_rank: int = 8
    # "attention": LoRA on the top's query/value projections; "all": on every linear layer of its
    # blocks, with an encoder's pooler trained whole (`none` converged 1.5 points higher at split 3,
    # `label-subspace` no higher: docs/results.md, "The top's recipe")
    lora_targets: str = "attention"
    learning_rate: float = 1e-3
    # defence (the mechanism's own options are validated by build_defense)
    defense: str = "label-subspace"
    epsilon: float = 64.0
    audit_tokens: int = 512  # tokens per release checked by the device's KNN self-audit
    # the defences' options: their defaults and help live in privtune_flwr.registry
    n_hops: int = PrivTuneOptions.n_hops
    k: int = PrivTuneOptions.k
    max_neighbours: int = PrivTuneOptions.max_neighbours
    radius_scale: float = PrivTuneOptions.radius_scale
    pgd_steps: int = PrivTuneOptions.pgd_steps
    lam: float = PrivTuneOptions.lam
    mu: float = PrivTuneOptions.mu
    s_min: float = PrivTuneOptions.s_min
    alpha: float = PrivTuneOptions.alpha
    importance_levels: int = PrivTuneOptions.importance_levels
    delta: float = GaussianOptions.delta
    clip: float = GaussianOptions.clip
    # label-subspace only: "reader" (a small reader trained with the projection) or "closed-form"
    # (Fisher directions, then principal ones: nothing trained; devices that fit apart agree)
    subspace_fit: str = LabelSubspaceOptions.subspace_fit
    # label-subspace only: "device" (each device fits its own map on its share, with defense.label-subspace.fit) or
    # "federation" (one map for all devices, before round 1: privtune_flwr.federated_map);
    # defense.label-subspace.fit-clip bounds each token's norm in the devices' noisy statistics, then
    # defense.label-subspace.fit-rounds rounds of private full-batch reader steps (each
    # sentence's gradient clipped to defense.label-subspace.fit-grad-clip; Adam at defense.label-subspace.fit-lr) train the
    # map's projection (privtune_flwr.federated_reader; 0 rounds: the closed-form map), on at most
    # defense.label-subspace.fit-devices devices per round (0 = all), drawn afresh each round;
    # defense.label-subspace.fit-optimizer: "cloud" (each asked device sends one noisy gradient sum a
    # round, fit-steps unused; the cloud takes one Adam step on their sum, so the noise is averaged
    # over the federation; docs/results.md, "One map for the federation") or "device" (each takes
    # fit-steps Adam steps on its own noisy sums and sends the change)
    subspace_fit_scope: str = "device"
    subspace_fit_clip: float = 14.0
    subspace_fit_rounds: int = 32
    subspace_fit_steps: int = 8
    subspace_fit_lr: float = 0.03
    subspace_fit_grad_clip: float = 1.0
    subspace_fit_devices: int = 100
    subspace_fit_optimizer: str = "cloud"
    subspace_rank: int = LabelSubspaceOptions.subspace_rank  # label-subspace / label-obfuscator: docs/results.md
    # noise: a secret key on each device, each example released once; both need the device's consent
    # (its node config / device policy) to be weakened
    release: str = "once"  # "once" | "fresh" (fresh noise per re-send; composes)
    reproducible_noise: bool = False  # research only: noise derived from `seed`, removable by the operator
    # u-shaped only: what the device does to the gradient it returns (privtune_flwr.label_protection):
    # none | max-norm | marvell (max-norm + noise of label-protection.noise x the class-mean difference along it)
    # | randomised-response (label DP with label-protection.epsilon, classification). The device's floor
    # (min-label-protection, max-label-epsilon, min-label-noise) may refuse a weaker choice.
    label_protection: str = "none"
    label_epsilon: float = 1.0
    label_noise: float = 4.0
    # the cloud: each training batch's gradient (vanilla), or each device's gradient of the middle's
    # LoRA weights (u-shaped), is clipped to this norm (bounds one device's influence on a round;
    # 0 = no clipping). Replies outside the defence's envelope are rejected.
    max_grad_norm: float = 1.0
    # run
    seed: int = 0
    output_dir: str = "outputs/run"
    timeout: float = 600.0  # seconds a round waits for its replies
    # the wait instead when a device is asked to train or evaluate for the first time: it fits its
    # defence then (a label map on all its sentences took 145 s alone, and timed out at 600 s with
    # three other jobs on 2 cores; docs/results.md, "Label maps in a federation")
    setup_timeout: float = 1800.0

    def __post_init__(self) -> None:
        _require(self.split_layer >= 0, "model.split-layer", self.split_layer, "an integer >= 0 (and <= the model's layer count)")
        _require(8 <= self.max_length <= 4096, "model.max-length", self.max_length, "8..4096")
        for part in ("bottom", "cloud"):
            device, dtype = getattr(self, part + "_device"), getattr(self, part + "_dtype")
            kind, _, index = device.partition(":")
            _require(kind in PLACEMENT_DEVICES and (not index or (kind == "cuda" and index.isdigit())),
                     key(part + "_device"), device, "cpu, cuda or cuda:<index>")
            _require(dtype in PLACEMENT_DTYPES, key(part + "_dtype"), dtype, ", ".join(PLACEMENT_DTYPES))
            _require(not (kind == "cpu" and dtype == "float16"), key(part + "_dtype"), dtype,
                     f"float32 or bfloat16 with {key(part + '_device')}='cpu' (float16 needs cuda)")
        _require(0 < self.test_fraction < 1, "data.test-fraction", self.test_fraction, "(0, 1)")
        _require(self.max_examples >= 0, "data.max-examples", self.max_examples, ">= 0 (0 = all)")
        _require(self.partitioner in PARTITIONERS, "data.partitioner", self.partitioner, " or ".join(PARTITIONERS))
        _require(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "> 0")
        _require(self.num_rounds >= 1, "federation.num-rounds", self.num_rounds, ">= 1")
        _require(self.devices_per_round >= 1, "federation.devices-per-round", self.devices_per_round, ">= 1")
        _require(self.min_devices >= 1, "federation.min-devices", self.min_devices, ">= 1")
        _require(0 <= self.round_retries <= 100, "federation.round-retries", self.round_retries, "0..100")
        _require(1 <= self.min_replies <= self.devices_per_round, "federation.min-replies", self.min_replies, f"1..federation.devices-per-round ({self.devices_per_round})")
        _require(self.batches_per_round >= 1, "train.batches-per-round", self.batches_per_round, ">= 1")
        _require(self.batch_size >= 1, "train.batch-size", self.batch_size, ">= 1")
        _require(self.eval_examples >= 0, "federation.eval-examples", self.eval_examples, ">= 0 (0 = all)")
        _require(self.eval_devices >= 0, "federation.eval-devices", self.eval_devices, ">= 0 (0 = every connected device)")
        _require(self.transport_dtype in TRANSPORT_DTYPES, "federation.transport-dtype", self.transport_dtype,
                 " or ".join(repr(t) for t in TRANSPORT_DTYPES))
        _require(self.reply_max_examples >= 1, "federation.reply-max-examples", self.reply_max_examples, ">= 1")
        _require(self.protocol in PROTOCOLS, "federation.protocol", self.protocol, " or ".join(repr(p) for p in PROTOCOLS))
        _require(self.middle_steps in MIDDLE_STEPS, "train.middle-steps", self.middle_steps, " or ".join(repr(m) for m in MIDDLE_STEPS))
        _require(self.task in TASKS, "data.task", self.task, " or ".join(repr(t) for t in TASKS))
        _require(self.offsite_method in OFFSITE_METHODS, "offsite.method", self.offsite_method,
                 " or ".join(repr(m) for m in OFFSITE_METHODS))
        _require(math.isfinite(self.emulator_drop) and 0 < self.emulator_drop < 1, "offsite.emulator-drop", self.emulator_drop,
                 "(0, 1) (the share of the middle blocks the emulator drops)")
        _require(self.offsite_adapter_layers >= 1, "offsite.adapter-layers", self.offsite_adapter_layers, "an integer >= 1 (and < half the model's blocks)")
        _require(0 <= self.distill_steps <= 100_000, "offsite.distill-steps", self.distill_steps, "0..100000")
        _require(math.isfinite(self.svd_rank_fraction) and 0 < self.svd_rank_fraction <= 1, "offsite.svd-rank-fraction",
                 self.svd_rank_fraction, "(0, 1] (rank / min(rows, columns) of each factorised weight)")
        _require(1 <= self.local_steps <= 4096, "offsite.local-steps", self.local_steps, "1..4096")
        if self.protocol == "offsite":
            _require(self.lora_rank >= 1, "model.lora-rank", self.lora_rank, ">= 1 with federation.protocol='offsite' (the adapters are LoRA)")
            if self.model in OFFSITE_DEPTHS and self.offsite_adapter_layers >= 1 and 0 < self.emulator_drop < 1:
                problem = offsite_emulator_problem(OFFSITE_DEPTHS[self.model], self.offsite_adapter_layers, self.emulator_drop)
                if problem is not None:
                    _require(False, *problem)
        _require(not (self.task == "generation" and self.protocol == "vanilla"), "federation.protocol", self.protocol,
                 "'u-shaped' for data.task='generation' (with the vanilla split the cloud would receive the labels, "
                 "which for a language model are the text itself)")
        _require(self.task == "generation" or self.num_labels >= 2, "model.num-labels", self.num_labels,
                 ">= 2 for classification (the number of classes of the dataset)")
        _require(0 <= self.generate_samples <= 64, "generation.samples", self.generate_samples, "0..64")
        _require(1 <= self.max_new_tokens <= 256, "generation.max-new-tokens", self.max_new_tokens, "1..256")
        _require(self.defense in DEFENSE_NAMES, "defense.name", self.defense, ", ".join(DEFENSE_NAMES))
        _require(not (self.task == "generation" and self.defense in LABEL_DEFENSES), "defense.name", self.defense,
                 f"a defence other than {' or '.join(map(repr, LABEL_DEFENSES))} for data.task='generation' (they keep what "
                 "predicts a class label; a generation task has none)")
        _require(self.lora_rank >= 0, "model.lora-rank", self.lora_rank, ">= 0")
        _require(self.lora_targets in LORA_TARGET_CHOICES, "model.lora-targets", self.lora_targets,
                 " or ".join(repr(t) for t in LORA_TARGET_CHOICES))
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "train.learning-rate", self.learning_rate, "(0, inf)")
        _require(math.isfinite(self.epsilon) and self.epsilon > 0, "defense.epsilon", self.epsilon, "(0, inf)")
        _require(self.audit_tokens >= 0, "defense.audit-tokens", self.audit_tokens, ">= 0 (0 = no self-audit)")
        _require(math.isfinite(self.timeout) and self.timeout > 0, "federation.timeout", self.timeout, "(0, inf) seconds")
        _require(math.isfinite(self.setup_timeout) and self.setup_timeout > 0, "federation.setup-timeout", self.setup_timeout,
                 "(0, inf) seconds")
        _require(self.release in RELEASES, "defense.release", self.release, " or ".join(RELEASES))
        _require(0 <= self.importance_levels <= 64, "defense.privtune.importance-levels", self.importance_levels, "0..64 (0 = continuous)")
        _require(self.subspace_fit in SUBSPACE_FITS, "defense.label-subspace.fit", self.subspace_fit,
                 " or ".join(repr(f) for f in SUBSPACE_FITS))
        _require(self.subspace_fit_scope in MAP_SCOPES, "defense.label-subspace.fit-scope", self.subspace_fit_scope,
                 " or ".join(repr(s) for s in MAP_SCOPES))
        _require(math.isfinite(self.subspace_fit_clip) and self.subspace_fit_clip > 0, "defense.label-subspace.fit-clip",
                 self.subspace_fit_clip, "(0, inf)")
        _require(0 <= self.subspace_fit_rounds <= 1000, "defense.label-subspace.fit-rounds", self.subspace_fit_rounds, "0..1000")
        _require(1 <= self.subspace_fit_steps <= 1000, "defense.label-subspace.fit-steps", self.subspace_fit_steps, "1..1000")
        _require(math.isfinite(self.subspace_fit_lr) and 0 < self.subspace_fit_lr <= 1, "defense.label-subspace.fit-lr",
                 self.subspace_fit_lr, "(0, 1]")
        _require(math.isfinite(self.subspace_fit_grad_clip) and self.subspace_fit_grad_clip > 0,
                 "defense.label-subspace.fit-grad-clip", self.subspace_fit_grad_clip, "(0, inf)")
        _require(self.subspace_fit_devices >= 0, "defense.label-subspace.fit-devices", self.subspace_fit_devices,
                 "an integer >= 0 (0 = every device)")
        _require(self.subspace_fit_optimizer in FIT_OPTIMIZERS, "defense.label-subspace.fit-optimizer",
                 self.subspace_fit_optimizer, " or ".join(repr(o) for o in FIT_OPTIMIZERS))
        _require(self.subspace_rank >= 1, "defense.label-subspace.rank", self.subspace_rank, "an integer >= 1 (and <= the hidden size)")
        _require(0 < self.s_min <= 1, "defense.privtune.s-min", self.s_min, "(0, 1]")
        _require(0 < self.delta < 1, "defense.gaussian.delta", self.delta, "(0, 1)")
        _require(self.radius_scale >= 0 and math.isfinite(self.radius_scale), "defense.privtune.radius-scale", self.radius_scale, "[0, inf)")
        _require(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "train.max-grad-norm", self.max_grad_norm,
                 "[0, inf) (0 = no clipping)")
        _require(self.label_protection in LABEL_PROTECTIONS, "label-protection.method", self.label_protection,
                 ", ".join(LABEL_PROTECTIONS))
        _require(math.isfinite(self.label_epsilon) and 0 < self.label_epsilon <= 64, "label-protection.epsilon", self.label_epsilon,
                 "(0, 64] (randomised response's epsilon)")
        _require(math.isfinite(self.label_noise) and 0 < self.label_noise <= 1000, "label-protection.noise", self.label_noise,
                 "(0, 1000] (marvell's noise along the class-mean difference, in units of its norm)")
        _require(self.label_protection == "none" or self.protocol == "u-shaped", "label-protection.method", self.label_protection,
                 "'none' with federation.protocol='vanilla' (the vanilla protocol sends the labels themselves)")
        _require(not (self.label_protection == "randomised-response" and self.task != "classification"), "label-protection.method",
                 self.label_protection, "max-norm, marvell or none for data.task='generation' (randomised response is over "
                 "class labels)")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (grouped keys, ``model.split-layer``); unknown
        keys, and the flat keys of earlier versions, are an error."""
        values: dict[str, Any] = {}
        for name, value in run_config.items():
            problem = key_problem(name)
            if problem is not None:
                raise ValueError(problem)
            values[FIELDS[name]] = _coerce(name, value, type(getattr(cls, FIELDS[name])))
        return cls(**values)

    def device_placement(self) -> dict[str, str]:
        """``load_split`` keywords for a device's copy: its bottom (and a u-shaped head) where
        configured. Its top never runs there (vanilla) or is dropped (u-shaped), so it stays on the
        CPU in the bottom's dtype, which spares a float32 copy when loading (float16, refused on a
        CPU, is bfloat16 there)."""
        return {"bottom_device": self.bottom_device, "bottom_dtype": self.bottom_dtype, "top_device": "cpu",
                "top_dtype": "bfloat16" if self.bottom_dtype == "float16" else self.bottom_dtype}

    def cloud_placement(self) -> dict[str, str]:
        """``load_split`` keywords for the cloud's copy: its top (or middle) where configured; the
        bottom, which the cloud never runs, on its CPU in the cloud's dtype (as above)."""
        return {"bottom_device": "cpu", "bottom_dtype": "bfloat16" if self.cloud_dtype == "float16" else self.cloud_dtype,
                "top_device": self.cloud_device, "top_dtype": self.cloud_dtype}

    def defense_options(self) -> dict[str, Any]:
        """Keyword options of ``build_defense`` for the configured defence (its registry options)."""
        spec = registry.get(self.defense)
        return {name: getattr(self, name) for name in spec.option_names()}

    def statement(self, *, radius: float = 0.0) -> "PrivacyStatement":
        """The configured defence's statement as the cloud can state it: from this run config and
        the public shift radius the devices report (built as the device's defence builds its own)."""
        spec = registry.get(self.defense)
        statement = spec.statement(spec.options_from(self), epsilon=self.epsilon, release=self.release,
                                   reproducible=self.reproducible_noise,
                                   key_source=f"seed {self.seed!r}" if self.reproducible_noise else "os-entropy",
                                   radius=radius)
        # the federation's map is covered by the fit phase's statement, not the device's own fit's words
        return replace(statement, map_scope="federation") if self.federated_map() else statement

    def federated_map(self) -> bool:
        """True when the devices fit one label map together before round 1."""
        return self.defense == "label-subspace" and self.subspace_fit_scope == "federation"

    def defense_summary(self) -> str:
        """The defence and only the settings it uses, e.g. ``defense=dchi eps=64``."""
        if self.defense == "none":
            return "defense=none (representations released without noise)"
        spec = registry.get(self.defense)
        shown = {"eps": f"{self.epsilon:g}", **spec.summary(spec.options_from(self))}
        if self.federated_map():
            shown["fit"] = "federation"
        if self.release != "once":
            shown["release"] = self.release
        text = f"defense={self.defense} " + " ".join(f"{k}={v}" for k, v in shown.items())
        return text + (" REPRODUCIBLE NOISE (not private against the operator)" if self.reproducible_noise else "")

    def to_flower(self) -> dict[str, Any]:
        return {KEYS[k]: v for k, v in asdict(self).items()}


def pyproject_table() -> str:
    """``[tool.flwr.app.config]`` as ``pyproject.toml`` holds it, generated from RunConfig's defaults
    in the groups of :mod:`privtune_flwr.keys`: ``python -m privtune_flwr.config`` prints it, and a
    test keeps the file equal to it, so a default is written in RunConfig alone."""
    defaults = RunConfig().to_flower()

    def toml(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return json.dumps(value) if isinstance(value, str) else repr(value)

    lines = ["[tool.flwr.app.config]",
             "# generated by `python -m privtune_flwr.config` from RunConfig's defaults, grouped as privtune_flwr/keys.py"]
    for group, leaves in GROUPS.items():
        lines.append("")
        lines += [f"{group}.{leaf} = {toml(defaults[f'{group}.{leaf}'])}" for leaf in leaves.values()]
    return "\n".join(lines) + "\n"


def offsite_emulator_problem(num_layers: int, adapter_layers: int, drop: float) -> tuple[str, Any, str] | None:
    """``(key, value, accepted)`` of what is wrong with an emulator of a ``num_layers``-block model
    that keeps the first and last ``adapter_layers`` blocks and drops ``drop`` of the middle; None
    if nothing is."""
    if isinstance(adapter_layers, bool) or not isinstance(adapter_layers, int) or adapter_layers < 1 or 2 * adapter_layers >= num_layers:
        return ("offsite.adapter-layers", adapter_layers, f"1..{(num_layers - 1) // 2} for a model of {num_layers} blocks (the first "
                "and the last offsite-adapter-layers blocks are the adapter; at least one block must lie between them)")
    middle = num_layers - 2 * adapter_layers
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not (math.isfinite(drop) and 0 < drop < 1):
        return ("offsite.emulator-drop", drop, "(0, 1)")
    keep = _kept_middle(middle, drop)
    where = f"{middle} middle blocks (offsite.adapter-layers={adapter_layers} of {num_layers})"
    if keep < 1:
        return ("offsite.emulator-drop", drop, f"a drop that keeps a middle block: this one drops all {where}; accepted: "
                f"emulator-drop <= {1 - 0.5 / middle:.4g}")
    if keep >= middle:
        return ("offsite.emulator-drop", drop, f"a drop that removes a middle block: this one drops none of the {where}; "
                f"accepted: emulator-drop > {0.5 / middle:.4g}")
    return None


def middle_keep_count(num_layers: int, adapter_layers: int, drop: float) -> int:
    """How many middle blocks an offsite emulator keeps (``floor((1 - drop) M + 1/2)`` of the ``M``
    between the adapters); a ValueError naming the value and the accepted range if that is no
    middle block, all of them, or the adapters leave no middle."""
    problem = offsite_emulator_problem(num_layers, adapter_layers, drop)
    if problem is not None:
        key, value, accepted = problem
        raise ValueError(f"{key}={value!r} is outside the accepted range: {accepted}")
    return _kept_middle(num_layers - 2 * adapter_layers, drop)


def _kept_middle(middle: int, drop: float) -> int:
    return int(math.floor((1.0 - drop) * middle + 0.5))  # half up (Python's round() goes to even)


def key_problem(name: str) -> str | None:
    """What is wrong with the run-config key ``name`` (None: it is a key): a key that left the run
    config, a flat key of an earlier version (the message names its grouped key), or an unknown one."""
    if name in FIELDS:
        return None
    if name in REMOVED_KEYS:
        return f"{name} is no longer a run-config key: {REMOVED_KEYS[name]}"
    if name in RENAMED:
        return renamed_message(name)
    return unknown_key_message(name, list(FIELDS))


def unknown_key_message(key: str, accepted: list[str]) -> str:
    """"unknown key 'federation.num-round'; did you mean 'federation.num-rounds'?", else the
    accepted keys. A key is also matched by its last part, so that a flat 'num-round' finds
    'federation.num-rounds'."""
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    if not close:
        leaves = {k.rsplit(".", 1)[-1]: k for k in accepted}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.8)]
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; accepted: {', '.join(sorted(accepted))}"


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be true or false")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: booleans are not accepted here")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}") from None


def collect_errors(run_config: Mapping[str, Any]) -> tuple[RunConfig, list[str]]:
    """Every problem of ``run_config`` at once (``RunConfig.from_flower`` stops at the first):
    the configuration built from the values that passed (a bad key is left out, a bad value
    replaced by its default, a range failure kept) and one message per problem, in key order."""
    values: dict[str, Any] = {}
    errors: list[str] = []
    for name, value in run_config.items():
        problem = key_problem(name)
        if problem is not None:
            errors.append(problem)
        else:
            try:
                values[FIELDS[name]] = _coerce(name, value, type(getattr(RunConfig, FIELDS[name])))
            except ValueError as exc:
                errors.append(str(exc))
    _COLLECTED.errors = []
    try:
        cfg = RunConfig(**values)
        errors += _COLLECTED.errors
    finally:
        del _COLLECTED.errors
    return cfg, errors


_COLLECTED = threading.local()  # while collect_errors builds a RunConfig: its range failures


def _require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        message = f"{key}={value!r} is outside the accepted range: {accepted}"
        collected = getattr(_COLLECTED, "errors", None)
        if collected is None:
            raise ValueError(message)
        collected.append(message)


if __name__ == "__main__":
    print(pyproject_table(), end="")
