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
                                                   (PrivTune scales its noise down to s-min on
                                                   important tokens: their parameter is eps / s)
``max-delta``              1e-5                    the largest delta accepted (``gaussian``)
``max-radius-scale``       1.0                     the largest PrivTune ``radius-scale`` accepted (its
                                                   mean shift r enters the bound as a slack 2 r eps/s)
``allow-continuous-scales`` false                  accept ``importance-levels = 0`` (the paper's
                                                   continuous noise scale: no bound across tokens)
``max-subspace-rank``      2                       the most directions (features) per token a label
                                                   defence may keep: its protection against
                                                   inversion comes from this rank, not from epsilon
                                                   (README, "Who chooses the basis")
``min-split-layer``        1                       the fewest blocks the device runs before it
                                                   releases (0 releases the embedding layer's
                                                   output, on which no defence was measured; the
                                                   cloud chooses split-layer)
``allow-reproducible-noise`` false                 accept ``reproducible-noise = true`` (seeded noise
                                                   the operator can remove: research only)
``allow-fresh-noise``      false                   accept ``release = 'fresh'`` (noise that composes
                                                   over re-sends)
``max-batches-per-instruction`` 64                 the most batches one instruction may ask for
``data-dir``               (none)                  the only folder local dataset files may be read
                                                   from; bundled datasets are always allowed
``allow-hub-datasets``     false                   accept Hugging Face dataset ids (downloads)
``key-store``              auto                    ``memory``, ``file``, or ``auto`` (see below)
``key-file``               see below               where a ``file`` key is kept
========================== ======================= =================================================

The noise key: with ``auto`` a simulated device keeps it in memory (its ``context.state``: a new
key per run) and any other device keeps it in ``key-file`` (default ``$PRIVTUNE_DEVICE_HOME`` or
``~/.local/share/privtune_flwr``, ``device-<partition-id>.key``), created from OS entropy on first
use, readable by its owner only, so release once survives a restart.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .config import LABEL_DEFENSES, RunConfig

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
}
_COUNTS = {"max_subspace_rank": 1, "max_batches_per_instruction": 1, "min_split_layer": 0}  # integers >= these


def _key(name: str) -> str:
    return name.replace("_", "-")


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
    data_dir: str = ""
    allow_hub_datasets: bool = False
    max_batches_per_instruction: int = 64  # the most work one instruction may ask for
    key_store: str = "auto"  # "auto" (memory when simulated, else file) | "memory" | "file"
    key_file: str = ""

    def __post_init__(self):
        names = _defense_names()
        if not self.allowed_defenses:
            object.__setattr__(self, "allowed_defenses", tuple(n for n in names if n != "none"))
        bad = [n for n in self.allowed_defenses if n not in names]
        if bad:
            raise ValueError(f"allowed-defenses names unknown defences {bad}; accepted: {', '.join(names)} or '*'")
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
            raise PolicyError(f"this device refuses defense={cfg.defense!r}: its floor allows "
                              f"{', '.join(self.allowed_defenses)} (node config 'allowed-defenses')")
        if cfg.defense != "none" and cfg.epsilon > self.max_epsilon:
            raise PolicyError(f"this device refuses epsilon={cfg.epsilon:g}: its floor is max-epsilon={self.max_epsilon:g} "
                              "(node config 'max-epsilon')")
        if cfg.defense != "none":
            from .accounting import statement_for_config

            statement = statement_for_config(cfg)
            smallest = min(statement.scales)
            if smallest < self.min_noise_scale:
                raise PolicyError(f"this device refuses s-min={cfg.s_min:g} for defense={cfg.defense!r} (noise scaled down "
                                  f"to {smallest:g}, a per-token epsilon of {cfg.epsilon / smallest:g}): its floor is "
                                  f"min-noise-scale={self.min_noise_scale:g} (node config 'min-noise-scale')")
            if statement.continuous and not self.allow_continuous_scales:
                raise PolicyError(f"this device refuses importance-levels=0 for defense={cfg.defense!r} (a continuous "
                                  "noise scale: no bound holds between tokens released at different scales); its floor "
                                  "needs node config 'allow-continuous-scales=true'")
            shifted = cfg.defense.startswith("privtune") and cfg.defense != "privtune-nomean"
            if shifted and cfg.radius_scale > self.max_radius_scale:
                raise PolicyError(f"this device refuses radius-scale={cfg.radius_scale:g} (the mean shift's radius, a "
                                  f"slack of 2 r eps / s in the bound): its floor is max-radius-scale="
                                  f"{self.max_radius_scale:g} (node config 'max-radius-scale')")
        if cfg.defense != "none" and cfg.split_layer < self.min_split_layer:
            raise PolicyError(f"this device refuses split-layer={cfg.split_layer} for defense={cfg.defense!r}: its floor is "
                              f"min-split-layer={self.min_split_layer} (node config 'min-split-layer'; the defences' "
                              "protection was measured on blocks' outputs, not on the embedding layer's)")
        if cfg.defense == "gaussian" and cfg.delta > self.max_delta:
            raise PolicyError(f"this device refuses delta={cfg.delta:g}: its floor is max-delta={self.max_delta:g} "
                              "(node config 'max-delta')")
        if cfg.defense in LABEL_DEFENSES and cfg.subspace_rank > self.max_subspace_rank:
            raise PolicyError(f"this device refuses subspace-rank={cfg.subspace_rank} for defense={cfg.defense!r}: the "
                              f"rank is what keeps tokens from being inverted, and its floor is max-subspace-rank="
                              f"{self.max_subspace_rank} (node config 'max-subspace-rank')")
        if cfg.reproducible_noise and not self.allow_reproducible_noise:
            raise PolicyError("this device refuses reproducible-noise=true (noise the operator could regenerate and "
                              "remove); its floor needs node config 'allow-reproducible-noise=true'")
        if cfg.release == "fresh" and not self.allow_fresh_noise:
            raise PolicyError("this device refuses release='fresh' (fresh noise per re-send composes); its floor needs "
                              "node config 'allow-fresh-noise=true'")
        self.check_dataset(cfg.dataset)

    def check_batches(self, num_batches: int) -> None:
        if num_batches > self.max_batches_per_instruction:
            raise PolicyError(f"this device refuses num-batches={num_batches} in one instruction: its floor allows at most "
                              f"{self.max_batches_per_instruction} (node config 'max-batches-per-instruction')")

    def check_dataset(self, name: str) -> None:
        from .data import DATASETS as OFFLINE_DATASETS

        if name in OFFLINE_DATASETS:
            return
        path = Path(name).expanduser()
        if path.exists() or name.startswith(("/", ".", "~")) or name.endswith((".csv", ".json", ".jsonl")):
            if not self.data_dir:
                raise PolicyError(f"this device refuses to read dataset={name!r}: local files are read only from its "
                                  "data-dir, and none is set (node config 'data-dir')")
            root = Path(self.data_dir).expanduser().resolve()
            if not path.resolve().is_relative_to(root):
                raise PolicyError(f"this device refuses to read dataset={name!r}: it lies outside its data-dir {root}")
            return
        if not self.allow_hub_datasets:
            raise PolicyError(f"this device refuses dataset={name!r}: accepted are the bundled datasets "
                              f"({', '.join(OFFLINE_DATASETS)}), files under its data-dir, and hub ids only with "
                              "node config 'allow-hub-datasets=true'")

    def key_path(self, partition_id: int) -> Path:
        if self.key_file:
            return Path(self.key_file).expanduser()
        home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".local", "share", "privtune_flwr")
        return Path(home) / f"device-{partition_id}.key"
