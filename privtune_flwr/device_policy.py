"""The device's own privacy floor: what a run config (chosen by the cloud) may ask of a device.

The cloud configures runs; the device decides what it accepts. The floor comes from sources the
device owns, never from the run config:

1. these defaults (safe for a deployment);
2. the environment variable ``PRIVTUNE_DEVICE_POLICY`` of the device's process, in Flower's
   ``--node-config`` syntax (the only channel a *simulated* device has: Flower gives simulated
   SuperNodes no node config beyond their partition);
3. the SuperNode's ``--node-config`` keys (a deployment).

A run config that asks for less privacy than the floor gets an error reply that names the floor.

Keys (node-config spelling):

========================== ======================= =================================================
key                        default                 meaning
========================== ======================= =================================================
``allowed-defenses``       every defence but none  comma-separated names, or ``*``
``max-epsilon``            64.0                    the largest epsilon accepted
``min-noise-scale``        0.5                     the smallest scale s on a token's noise accepted
                                                   (PrivTune scales its noise down to defense.privtune.s-min on
                                                   important tokens: their parameter is eps / s)
``max-delta``              1e-5                    the largest delta accepted (``gaussian``)
``max-radius-scale``       1.0                     the largest PrivTune ``defense.privtune.radius-scale`` accepted (its
                                                   mean shift r enters the bound as a slack 2 r eps/s)
``allow-continuous-scales`` false                  accept ``defense.privtune.importance-levels = 0`` (the paper's
                                                   continuous noise scale: no bound across tokens)
``max-subspace-rank``      2                       the most directions (features) per token a label
                                                   defence may keep: its protection against
                                                   inversion comes from this rank, not from epsilon
                                                   (docs/privacy.md, "Who chooses the basis")
``min-split-layer``        1                       the fewest blocks the device runs before it
                                                   releases (0 releases the embedding layer's
                                                   output, on which no defence was measured; the
                                                   cloud chooses model.split-layer)
``allow-reproducible-noise`` false                 accept ``defense.reproducible-noise = true`` (seeded noise
                                                   the operator can remove: research only)
``allow-fresh-noise``      false                   accept ``release = 'fresh'`` (noise that composes
                                                   over re-sends)
``allow-offsite``          false                   accept ``protocol = 'offsite'``: the device trains
                                                   adapters on its data and sends them, model
                                                   updates that no defence or bound covers
``max-batches-per-instruction`` 64                 the most batches one instruction may ask for
``max-examples-per-instruction`` 1024              the most examples one instruction may release
                                                   (train: batches x train.batch-size; evaluate: the
                                                   test examples it reads)
``max-tokens-per-example`` 256                     the largest ``model.max-length`` accepted (memory and
                                                   time grow with examples x tokens)
``max-instruction-seconds`` 600                    the longest one instruction's release may run;
                                                   past it the device stops and sends nothing
``max-releases-per-example`` 1                     distinct releases of one example, across
                                                   configurations and runs (a new epsilon, option,
                                                   map or fresh noise is a new release); the
                                                   ledger is kept with the key
``allowed-models``         minilm,smollm2          comma-separated: offline names, local folders
                                                   (absolute paths), ``sha256:<hex>`` digests of a
                                                   folder's weight files, or ``*`` (any offline
                                                   name or local folder)
``allow-hub-models``       false                   accept Hugging Face model ids (downloads)
``min-split-layers``       smollm2:2               a higher floor on model.split-layer for these models,
                                                   beside ``min-split-layer`` (so MiniLM >= 1 and
                                                   SmolLM2 >= 2 by default; even at split 2 the
                                                   learned inverter reads 0.64 of SmolLM2's
                                                   tokens under every defence: docs/results.md)
``data-dir``               (none)                  the only folder local dataset files may be read
                                                   from; bundled datasets are always allowed
``allow-hub-datasets``     false                   accept Hugging Face dataset ids (downloads)
``min-label-protection``   none                    u-shaped: the weakest label protection accepted
                                                   (none < max-norm < marvell; randomised-response
                                                   meets any floor within max-label-epsilon); a
                                                   floor above none refuses the vanilla protocol
``max-label-epsilon``      1.0                     the largest randomised-response label-protection.epsilon
                                                   that meets a label-protection.method floor
``min-label-noise``        2.0                     the least marvell label-protection.noise that meets a
                                                   'marvell' floor
``fit-epsilon``            64.0                    the (epsilon, delta) per sentence of the whole
``fit-delta``              1e-5                    fit phase of the federation's label map: the
                                                   noisy statistics and the noisy reader steps
                                                   together (one sentence of model.max-length tokens;
                                                   ``inf``: no noise, the cloud sees them exactly)
``max-map-inversion``      0.13                    refuse a label map through which an inverter the
                                                   device trains on its own data recovers more of
                                                   its held-out tokens than this
``min-map-label-accuracy`` 0.0                     refuse a map through which the label reads back
                                                   below this on its held-out sentences
``key-store``              auto                    ``memory``, ``file``, or ``auto`` (see below)
``key-file``               see below               where a ``file`` key is kept
========================== ======================= =================================================

The noise key and the release ledger: with ``auto`` a simulated device keeps both in memory (its
``context.state``: a new key and a new ledger per run, so the budget holds for the run's
lifetime) and any other device keeps them in ``key-file`` (the ledger beside it, ``<key-file>.ledger.json``) (default ``$PRIVTUNE_DEVICE_HOME`` or
``~/.local/share/privtune_flwr``, then a folder named for the SuperNode, ``device-<partition-id>.key``:
see :func:`deployment_name`), created from OS entropy on first
use, readable by its owner only, so release once survives a restart.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from . import registry
from .config import RunConfig

log = logging.getLogger(__name__)

ENV = "PRIVTUNE_DEVICE_POLICY"
HOME_ENV = "PRIVTUNE_DEVICE_HOME"
FLOWER_NODE_KEYS = ("partition-id", "num-partitions")
KEY_STORES = ("auto", "memory", "file")


# The floor's numeric keys: the accepted range (as stated in errors) and its test (NaN fails each).
_NUMBERS = {
    "max_epsilon": ("(0, inf]", lambda v: v > 0),
    "min_noise_scale": ("(0, 1]", lambda v: 0 < v <= 1),
    "max_delta": ("(0, 1)", lambda v: 0 < v < 1),
    "max_radius_scale": ("[0, inf)", lambda v: 0 <= v < math.inf),
    "max_instruction_seconds": ("(0, inf]", lambda v: v > 0),
    "max_label_epsilon": ("(0, inf]", lambda v: v > 0),
    "min_label_noise": ("[0, inf)", lambda v: 0 <= v < math.inf),
    "fit_epsilon": ("(0, inf]", lambda v: v > 0),
    "fit_delta": ("(0, 1)", lambda v: 0 < v < 1),
    "max_map_inversion": ("[0, 1]", lambda v: 0 <= v <= 1),
    "min_map_label_accuracy": ("[0, 1]", lambda v: 0 <= v <= 1),
}
_COUNTS = {"max_subspace_rank": 1, "max_batches_per_instruction": 1, "min_split_layer": 0,  # integers >= these
           "max_examples_per_instruction": 1, "max_tokens_per_example": 2, "max_releases_per_example": 1}
OFFLINE_MODEL_NAMES = ("minilm", "smollm2")  # as privtune_flwr.models.OFFLINE_MODELS names them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _split_floors(key: str, value) -> tuple[tuple[str, int], ...]:
    """``"smollm2:2,/models/llama:4"`` -> ``(("smollm2", 2), ("/models/llama", 4))``."""
    out = []
    for item in str(value).split(","):
        if not item.strip():
            continue
        model, sep, floor = item.strip().rpartition(":")
        try:
            if not sep or not model:
                raise ValueError
            out.append((model, int(floor)))
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a list of model:floor pairs (e.g. 'smollm2:2,/models/llama:4')") from None
    return tuple(out)


def _floors_text(floors) -> str:
    return ",".join(f"{m}:{n}" for m, n in floors)


_DIGESTS: dict[tuple, str] = {}


def weights_digest(folder: str | os.PathLike) -> str:
    """SHA-256 over a model folder's weight files (names and bytes, in name order), hex: what
    ``allowed-models`` entries ``sha256:<hex>`` name. Cached per process by the files' sizes and
    modification times."""
    import hashlib

    folder = Path(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise PolicyError(f"model folder {folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}) to check "
                          "against the device's allowed-models digests")
    token = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if token not in _DIGESTS:
        digest = hashlib.sha256()
        for f in files:
            digest.update(str(f.relative_to(folder)).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        _DIGESTS[token] = digest.hexdigest()
    return _DIGESTS[token]


class PolicyError(ValueError):
    """The run config asks a device for less privacy than its floor allows."""


def _defense_names() -> tuple[str, ...]:
    from .defenses import DEFENSES

    return tuple(DEFENSES)


@dataclass(frozen=True)
class DevicePolicy:
    allowed_defenses: tuple[str, ...] = ()  # empty: every registered defence except "none"
    max_epsilon: float = 64.0
    min_noise_scale: float = 0.5
    max_delta: float = 1e-5
    max_subspace_rank: int = 2
    max_radius_scale: float = 1.0
    min_split_layer: int = 1
    allow_continuous_scales: bool = False
    allow_reproducible_noise: bool = False
    allow_fresh_noise: bool = False
    allow_offsite: bool = False
    data_dir: str = ""
    allow_hub_datasets: bool = False
    max_batches_per_instruction: int = 64  # the most work one instruction may ask for
    max_examples_per_instruction: int = 1024
    max_tokens_per_example: int = 256
    max_instruction_seconds: float = 600.0
    max_releases_per_example: int = 1  # across configurations and runs: see accounting.ReleaseLedger
    allowed_models: tuple[str, ...] = OFFLINE_MODEL_NAMES
    allow_hub_models: bool = False
    min_split_layers: tuple[tuple[str, int], ...] = (("smollm2", 2),)  # beside min-split-layer, for these models
    # u-shaped label protection (privtune_flwr.label_protection): the weakest accepted, in the order
    # none < max-norm < marvell; randomised-response meets any floor when label-protection.epsilon <= max-label-epsilon
    min_label_protection: str = "none"
    max_label_epsilon: float = 1.0
    min_label_noise: float = 2.0  # the least marvell label-protection.noise that meets a 'marvell' floor
    # the federation's label map (privtune_flwr.federated_map): the noise on this device's statistics,
    # and its own audit of the map it derives
    fit_epsilon: float = 64.0
    fit_delta: float = 1e-5
    # 10 honest Rotten Tomatoes devices (split 3, rank 2) measured 0.092-0.117 through the federation's
    # map (most frequent token alone: 0.046-0.057); the tokens' top-2 principal directions 0.150
    max_map_inversion: float = 0.13
    min_map_label_accuracy: float = 0.0
    key_store: str = "auto"  # "auto" (memory when simulated, else file) | "memory" | "file"
    key_file: str = ""

    def __post_init__(self):
        names = _defense_names()
        if not self.allowed_defenses:
            object.__setattr__(self, "allowed_defenses", tuple(n for n in names if n != "none"))
        bad = [n for n in self.allowed_defenses if n not in names]
        if bad:
            raise ValueError(f"allowed-defenses names unknown defences {bad}; accepted: {', '.join(names)} or '*'")
        bad = [(m, n) for m, n in self.min_split_layers if isinstance(n, bool) or not isinstance(n, int) or n < 0]
        if bad:
            raise ValueError(f"min-split-layers={bad!r}: each floor must be an integer >= 0 (e.g. 'smollm2:2,/models/llama:4')")
        from .config import LABEL_PROTECTIONS

        if self.min_label_protection not in LABEL_PROTECTIONS:
            raise ValueError(f"min-label-protection={self.min_label_protection!r} is not accepted; accepted: "
                             f"{', '.join(LABEL_PROTECTIONS)}")
        if self.key_store not in KEY_STORES:
            raise ValueError(f"key-store={self.key_store!r} is not accepted; accepted: {', '.join(KEY_STORES)}")
        for name, (accepted, ok) in _NUMBERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{_key(name)}={value!r} is outside the accepted range {accepted}")
        for name, least in _COUNTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{_key(name)}={value!r} must be an integer >= {least}")

    @classmethod
    def from_sources(cls, node_config: Mapping | None = None, env: Mapping | None = None) -> "DevicePolicy":
        """Defaults, then ``PRIVTUNE_DEVICE_POLICY`` from ``env``, then ``node_config``."""
        from flwr.common.config import parse_config_args

        env = os.environ if env is None else env
        values: dict = {}
        text = env.get(ENV, "").strip()
        if text:
            try:
                values.update(parse_config_args([text]))
            except Exception as exc:  # noqa: BLE001 - a malformed policy must name itself
                raise ValueError(f"{ENV}={text!r} is not in node-config syntax (k=v ...): {exc}") from None
        values.update({k: v for k, v in dict(node_config or {}).items() if k not in FLOWER_NODE_KEYS})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping) -> "DevicePolicy":
        known = {_key(f.name): f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                log.warning("device policy: ignoring unknown key %r (known: %s)", key, ", ".join(known))
                continue
            name = known[key].name
            if name == "allowed_defenses":
                text = str(value).strip()
                kwargs[name] = _defense_names() if text == "*" else tuple(v.strip() for v in text.split(",") if v.strip())
            elif name == "allowed_models":
                kwargs[name] = tuple(v.strip() for v in str(value).split(",") if v.strip())
            elif name == "min_split_layers":
                kwargs[name] = _split_floors(key, value)
            elif name in _NUMBERS:  # node config may give 64 or "64"; the range is checked on construction
                try:
                    if isinstance(value, bool):
                        raise TypeError(value)
                    kwargs[name] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{key}={value!r} is not a number; accepted: {_NUMBERS[name][0]}") from None
            elif name in _COUNTS:
                kwargs[name] = value
            elif name.startswith("allow_"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key}={value!r} must be true or false")
                kwargs[name] = value
            else:
                kwargs[name] = str(value)
        return cls(**kwargs)

    def check(self, cfg: RunConfig) -> None:
        """Raise :class:`PolicyError` naming the floor if ``cfg`` asks for less privacy."""
        if cfg.defense not in self.allowed_defenses:
            raise PolicyError(f"this device refuses defense.name={cfg.defense!r}: its floor allows "
                              f"{', '.join(self.allowed_defenses)} (node config 'allowed-defenses'; consent to every defence, none "
                              "included: allowed-defenses='*', e.g. the launcher's --device-policy \"allowed-defenses='*'\")")
        if cfg.defense != "none" and cfg.epsilon > self.max_epsilon:
            raise PolicyError(f"this device refuses defense.epsilon={cfg.epsilon!r}: its floor is max-epsilon={self.max_epsilon!r} "
                              "(node config 'max-epsilon')")
        spec = registry.get(cfg.defense)
        if spec.noisy:
            statement = cfg.statement()
            smallest = min(statement.scales)
            if smallest < self.min_noise_scale:
                raise PolicyError(f"this device refuses defense.privtune.s-min={cfg.s_min:g} for defense.name={cfg.defense!r} (noise scaled down "
                                  f"to {smallest:g}, a per-token epsilon of {cfg.epsilon / smallest:g}): its floor is "
                                  f"min-noise-scale={self.min_noise_scale:g} (node config 'min-noise-scale')")
            if statement.continuous and not self.allow_continuous_scales:
                raise PolicyError(f"this device refuses defense.privtune.importance-levels=0 for defense.name={cfg.defense!r} (a continuous "
                                  "noise scale: no bound holds between tokens released at different scales); its floor "
                                  "needs node config 'allow-continuous-scales=true'")
            if spec.shifts and cfg.radius_scale > self.max_radius_scale:
                raise PolicyError(f"this device refuses defense.privtune.radius-scale={cfg.radius_scale:g} (the mean shift's radius, a "
                                  f"slack of 2 r eps / s in the bound): its floor is max-radius-scale="
                                  f"{self.max_radius_scale:g} (node config 'max-radius-scale')")
        if cfg.defense != "none" and cfg.split_layer < self.min_split_layer:
            raise PolicyError(f"this device refuses model.split-layer={cfg.split_layer} for defense.name={cfg.defense!r}: its floor is "
                              f"min-split-layer={self.min_split_layer} (node config 'min-split-layer'; the defences' "
                              "protection was measured on blocks' outputs, not on the embedding layer's)")
        floors = dict(self.min_split_layers)
        if cfg.defense != "none" and cfg.split_layer < floors.get(cfg.model, 0):
            raise PolicyError(f"this device refuses model.split-layer={cfg.split_layer} for model.name={cfg.model!r}: its floor for "
                              f"that model is {floors[cfg.model]} (node config 'min-split-layers', now "
                              f"{_floors_text(self.min_split_layers)!r})")
        self.check_model(cfg.model)
        if cfg.max_length > self.max_tokens_per_example:
            raise PolicyError(f"this device refuses model.max-length={cfg.max_length} tokens per example: its floor allows at most "
                              f"{self.max_tokens_per_example} (node config 'max-tokens-per-example')")
        if cfg.defense == "gaussian" and cfg.delta > self.max_delta:
            raise PolicyError(f"this device refuses defense.gaussian.delta={cfg.delta:g}: its floor is max-delta={self.max_delta:g} "
                              "(node config 'max-delta')")
        if spec.fits_labels and cfg.subspace_rank > self.max_subspace_rank:
            raise PolicyError(f"this device refuses defense.label-subspace.rank={cfg.subspace_rank} for defense.name={cfg.defense!r}: the "
                              f"rank is what keeps tokens from being inverted, and its floor is max-subspace-rank="
                              f"{self.max_subspace_rank} (node config 'max-subspace-rank')")
        if cfg.reproducible_noise and not self.allow_reproducible_noise:
            raise PolicyError("this device refuses defense.reproducible-noise=true (noise the operator could regenerate and "
                              "remove); its floor needs node config 'allow-reproducible-noise=true'")
        if cfg.release == "fresh" and not self.allow_fresh_noise:
            raise PolicyError("this device refuses defense.release='fresh' (fresh noise per re-send composes); its floor needs "
                              "node config 'allow-fresh-noise=true'")
        self.check_dataset(cfg.dataset)
        self.check_label_protection(cfg)

    def check_offsite(self) -> None:
        """Refuse the offsite protocol unless the device admits it (``allow-offsite``)."""
        if not self.allow_offsite:
            raise PolicyError("this device refuses federation.protocol='offsite': it would send adapter weights trained on its "
                              "data, which no defence or privacy bound covers; its floor needs node config "
                              "'allow-offsite=true'")

    def check_label_protection(self, cfg: RunConfig) -> None:
        """Refuse a run whose u-shaped label protection is weaker than ``min-label-protection``."""
        from .label_protection import STRENGTH

        floor, asked = self.min_label_protection, cfg.label_protection
        if floor == "none":
            return
        where = (f"its floor is min-label-protection={floor!r} (node config 'min-label-protection'; "
                 f"randomised-response meets any floor with label-epsilon <= max-label-epsilon={self.max_label_epsilon:g})")
        if cfg.protocol != "u-shaped":
            raise PolicyError(f"this device refuses federation.protocol={cfg.protocol!r}: it sends the labels themselves, and {where}")
        if asked == "randomised-response":
            if cfg.label_epsilon > self.max_label_epsilon:
                raise PolicyError(f"this device refuses label-protection.epsilon={cfg.label_epsilon:g} for randomised-response: its "
                                  f"floor is max-label-epsilon={self.max_label_epsilon:g} (node config 'max-label-epsilon')")
            return
        if floor == "randomised-response" or STRENGTH[asked] < STRENGTH[floor]:
            raise PolicyError(f"this device refuses label-protection.method={asked!r}: {where}")
        if floor == "marvell" and cfg.label_noise < self.min_label_noise:
            raise PolicyError(f"this device refuses label-protection.noise={cfg.label_noise:g} for marvell: its floor is "
                              f"min-label-noise={self.min_label_noise:g} (node config 'min-label-noise')")

    def check_batches(self, num_batches: int) -> None:
        if num_batches > self.max_batches_per_instruction:
            raise PolicyError(f"this device refuses num-batches={num_batches} in one instruction: its floor allows at most "
                              f"{self.max_batches_per_instruction} (node config 'max-batches-per-instruction')")

    def check_examples(self, examples: int, what: str) -> None:
        """Refuse an instruction that would release more than ``max-examples-per-instruction``."""
        if examples > self.max_examples_per_instruction:
            raise PolicyError(f"this device refuses to release {examples} examples in one instruction ({what}): its floor "
                              f"allows at most {self.max_examples_per_instruction} (node config "
                              "'max-examples-per-instruction')")

    def check_model(self, model: str) -> None:
        """Refuse a model the device did not agree to run: offline names and local folders must be
        listed (by name, path or a digest of the weights), hub ids need ``allow-hub-models``."""
        allowed = self.allowed_models
        if model in allowed:
            return
        folder = Path(model).expanduser()
        local = model not in OFFLINE_MODEL_NAMES and folder.is_dir()
        if model in OFFLINE_MODEL_NAMES or local:
            if "*" in allowed:
                return
            if local:
                resolved = folder.resolve()
                if any(not a.startswith("sha256:") and a not in OFFLINE_MODEL_NAMES and Path(a).expanduser().resolve() == resolved
                       for a in allowed):
                    return
                digests = {a.split(":", 1)[1].lower() for a in allowed if a.startswith("sha256:")}
                if digests and weights_digest(resolved) in digests:
                    return
            raise PolicyError(f"this device refuses model.name={model!r}: it runs only {', '.join(allowed) or 'no model'} "
                              "(node config 'allowed-models': offline names, local folders, sha256:<digest of the "
                              "weights> or '*')")
        if not self.allow_hub_models:
            raise PolicyError(f"this device refuses model.name={model!r}: it is neither an offline model ({', '.join(OFFLINE_MODEL_NAMES)}) "
                              "nor a local folder, and Hugging Face ids need node config 'allow-hub-models=true'")

    def check_dataset(self, name: str) -> None:
        from .data import DATASETS as OFFLINE_DATASETS

        if name in OFFLINE_DATASETS:
            return
        path = Path(name).expanduser()
        if path.exists() or name.startswith(("/", ".", "~")) or name.endswith((".csv", ".json", ".jsonl")):
            if not self.data_dir:
                raise PolicyError(f"this device refuses to read data.name={name!r}: local files are read only from its "
                                  "data-dir, and none is set (node config 'data-dir')")
            root = Path(self.data_dir).expanduser().resolve()
            if not path.resolve().is_relative_to(root):
                raise PolicyError(f"this device refuses to read data.name={name!r}: it lies outside its data-dir {root}")
            return
        if not self.allow_hub_datasets:
            raise PolicyError(f"this device refuses data.name={name!r}: accepted are the bundled datasets "
                              f"({', '.join(OFFLINE_DATASETS)}), files under its data-dir, and hub ids only with "
                              "node config 'allow-hub-datasets=true'")

    def key_path(self, partition_id: int) -> Path:
        """``key-file``, else ``<home>/<deployment>/device-<partition-id>.key``, where home is
        ``$PRIVTUNE_DEVICE_HOME`` or ``~/.local/share/privtune_flwr`` and the folder is named for
        the SuperNode this device runs under (:func:`deployment_name`), so two deployments on one
        machine never share a key or a ledger."""
        if self.key_file:
            return Path(self.key_file).expanduser()
        home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".local", "share", "privtune_flwr")
        return Path(home) / deployment_name() / f"device-{partition_id}.key"


def _ancestor_args(name: str) -> list[str] | None:
    """The arguments of the nearest ancestor process running ``name`` (Linux ``/proc``)."""
    pid = os.getpid()
    for _ in range(16):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if any(os.path.basename(a) == name for a in args[:2]):
            return args
        if parent <= 1:
            return None
        pid = parent
    return None


def deployment_name() -> str:
    """The folder a device's key and ledger live in: ``$PRIVTUNE_DEPLOYMENT`` when set, else named
    for the SuperNode it runs under: ``supernode-<SuperLink host_port>-<12 hex of its
    authentication key's path, or of its --node-config>``; ``local`` when there is no SuperNode."""
    import hashlib
    import re

    if os.environ.get("PRIVTUNE_DEPLOYMENT"):
        return re.sub(r"[^A-Za-z0-9._-]", "_", os.environ["PRIVTUNE_DEPLOYMENT"])
    args = _ancestor_args("flower-supernode")
    if args is None:
        return "local"

    def option(flag: str) -> str:
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return ""

    link = option("--superlink") or "127.0.0.1:9092"
    identity = option("--node-config").encode()
    key = option("--auth-supernode-private-key")
    if key:  # the key file's path (not its secret bytes): each SuperNode of each deployment has its own
        identity = str(Path(key).expanduser().resolve()).encode()
    digest = hashlib.sha256(link.encode() + b"\0" + identity).hexdigest()[:12]
    return f"supernode-{re.sub(r'[^A-Za-z0-9.-]', '_', link)}-{digest}"
