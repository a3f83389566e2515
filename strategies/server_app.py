"""The cloud: a Flower ServerApp that runs :class:`strategies.SplitLearningStrategy`."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from privtune_flwr import data
from privtune_flwr.accounting import is_finite_number, run_summary
from privtune_flwr.cloud import CloudSide, MiddleSide
from privtune_flwr.config import RunConfig
from privtune_flwr.models import load_split

from .reporting import NOT_REACHED, ProgressGrid, incomplete_rounds, last_evaluation
from .split_learning import SplitLearningStrategy
from .u_shaped import UShapedStrategy

log = logging.getLogger("privtune_flwr.cloud")
app = ServerApp()


def privacy_summary(cfg: RunConfig, history: list[dict]) -> dict:
    """The run's privacy statement (:mod:`privtune_flwr.accounting`), composed over releases.

    Everything comes from the configuration and from the public bounds the devices attach (the
    mean-shift radius comes from the public anchor tables); the worst case is taken over rounds.
    """

    def worst(key: str):
        values = [r[key] for r in history if is_finite_number(r.get(key))]
        return max(values) if values else None

    statement = cfg.statement(radius=worst("shift-radius") or 0.0)
    summary = run_summary(statement, max_tokens=cfg.max_length, train_releases=worst("releases-per-example-max"),
                          test_releases=worst("test-releases-per-example-max"))
    if cfg.federated_map():  # what the cloud learned before round 1, from the map's fit
        from privtune_flwr.accounting import federated_map_statement

        summary["fit-phase"] = federated_map_statement(cfg)
        summary["fit-phase-contributions"] = next((r.get("map-contributions") for r in history if "map-contributions" in r), None)
    return summary


def _console_log() -> None:
    """Round lines on the console, without switching on every library's INFO logging."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[cloud] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def new_run_folder(base: str | Path) -> Path:
    """A fresh folder for one run, ``<base>/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken)."""
    base = Path(base).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {base}")


def mark_latest(folder: Path) -> None:
    """Point ``<base>/latest`` at ``folder`` (atomically: readers see the old or the new run)."""
    tmp = folder.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder.name)
    os.replace(tmp, folder.parent / "latest")


def seed_cloud(seed: int) -> None:
    """Same seed, same machine, same cloud: initialisation, dropout and sampling are seeded and
    torch uses deterministic algorithms (a warning, not an error, where it has none)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_before_start(run_config: dict, *, simulated: bool | None = None) -> RunConfig:
    """Everything that can be known before start, every problem at once (as the launcher checks
    it): the keys and ranges, the model (offline? its family; model.split-layer against its depth,
    from its config) and, in a simulation, whose devices share this host, the dataset and the
    devices' policy (``$PRIVTUNE_DEVICE_POLICY`` over the defaults). A deployment's devices have
    their own data and node config: they refuse those themselves."""
    from privtune_flwr.preflight import preflight
    if simulated is None:
        simulated = os.path.basename(sys.argv[0]).startswith("flwr-simulation")
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    policy = os.environ.get("PRIVTUNE_DEVICE_POLICY", "") if simulated else None
    cfg, errors = preflight(run_config, device_policy=policy, offline=offline)
    if not simulated:
        errors = [e for e in errors if not e.startswith("data.name=")]
    if errors:
        for error in errors:
            log.error("refused before start: %s", error)
        raise ValueError(f"{len(errors)} problem{'s' if len(errors) > 1 else ''} in the run config: " + " | ".join(errors))
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.perf_counter()
    _console_log()
    cfg = check_before_start(dict(context.run_config))
    seed_cloud(cfg.seed)
    out = new_run_folder(cfg.output_dir)
    log.info("run folder: %s", out)
    log.info("loading %s, split after block %d (%s protocol)...", cfg.model, cfg.split_layer, cfg.protocol)
    # Everything the cloud needs comes from the run config (model.num-labels): it never loads the data.
    num_labels = cfg.num_labels if cfg.task == "classification" else 0
    if cfg.protocol == "offsite":  # no split: the emulator's adapters, averaged and plugged into the full model
        from .offsite import OffsiteCloud, OffsiteStrategy

        split = cloud = OffsiteCloud(cfg)
        strategy = OffsiteStrategy(cloud, cfg, output_dir=out)
    else:
        split = load_split(cfg.model, cfg.split_layer, cfg.task, max(num_labels, 2), lora_rank=cfg.lora_rank, seed=cfg.seed,
                           protocol=cfg.protocol, lora_targets=cfg.lora_targets, **cfg.cloud_placement())
    if cfg.protocol == "u-shaped":
        cloud = MiddleSide(split, learning_rate=cfg.learning_rate)
        strategy = UShapedStrategy(cloud, cfg, output_dir=out)
    elif cfg.protocol == "vanilla":
        cloud = CloudSide(split, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed)
        strategy = SplitLearningStrategy(cloud, cfg, output_dir=out)
    if cfg.resume_from:
        strategy.resume(cfg.resume_from)
    log.info("model ready in %.1f s; the devices load theirs when first asked", time.perf_counter() - t0)
    error = None
    try:
        strategy.start(
            grid=ProgressGrid(grid),
            initial_arrays=ArrayRecord({k: v.contiguous() for k, v in split.trainable_state().items()}),
            num_rounds=cfg.num_rounds,
            timeout=cfg.timeout,
        )
    except Exception as exc:  # noqa: BLE001 - the results say what happened, then the run fails
        error = exc
    history = strategy.history
    failed = incomplete_rounds(history, strategy.rejected, cfg.num_rounds)
    if error is not None:  # the round it stopped in is the first incomplete one
        cause = f"{type(error).__name__}: {error}"
        if failed:
            failed[0]["causes"] = [cause] + [c for c in failed[0]["causes"] if c != NOT_REACHED]
        else:
            failed = [{"round": cfg.num_rounds, "did-not": ["finish"], "causes": [cause]}]
    final = last_evaluation(history)
    summary = {
        "status": "failed" if failed else "completed",
        "failed-rounds": failed,
        "config": cfg.to_flower(),
        "rounds": history,
        "rejected-replies": strategy.rejected.as_records(),
        "final": {
            "round": final.get("round"),
            "test-accuracy": final.get("test-accuracy"),
            "test-macro-f1": final.get("test-macro-f1"),
            "test-perplexity": final.get("test-perplexity"),
            "self-audit-knn": final.get("self-audit-knn"),
            "cloud-steps": cloud.steps,
        },
        "protocol": cfg.protocol,
        "resumed-from": cfg.resume_from or None,
        "devices-lost": strategy.devices_lost,
        "generation": getattr(strategy, "generation", {}),
        # offsite: no representation is released, so no mechanism's statement applies (adapters are model updates)
        "privacy": privacy_summary(cfg, history) if cfg.protocol != "offsite" else {
            "statement": "offsite tuning releases no representations; devices send adapter weights, with no formal "
                         "guarantee: a cloud that chooses the LoRA rank, the local steps and the adapters it sends reads "
                         "a short batch's text back from one update (privtune_flwr.attacks.updates)"},
        "emulator": getattr(cloud, "emulator_report", None),
        "wall-seconds": time.perf_counter() - t0,
        "server-peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable-parameters": sum(v.numel() for v in split.trainable_state().values()),
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "results.json")  # atomic: a reader sees the old file or the whole new one
    for line in strategy.rejected.summary():
        log.warning("rejected over the run: %s", line)
    if final and cfg.task == "generation":
        log.info("final: test perplexity %.3f, from round %d of %d (the last completed evaluation)",
                 final["test-perplexity"], final["round"], cfg.num_rounds)
    elif final:
        log.info("final: test accuracy %.4f, macro-F1 %.4f, from round %d of %d (the last completed evaluation)",
                 final["test-accuracy"], final["test-macro-f1"], final["round"], cfg.num_rounds)
    if failed:
        for row in failed:
            log.error("round %d did not %s: %s", row["round"], " and ".join(row["did-not"]), "; ".join(row["causes"]))
        log.error("results (of a failed run) in %s", out / "results.json")
        rounds = ", ".join(str(row["round"]) for row in failed)
        raise RuntimeError(f"the run failed: {len(failed)} of {cfg.num_rounds} rounds did not complete (round {rounds})") from error
    mark_latest(out)
    log.info("results in %s (also %s)", out / "results.json", out.parent / "latest")
