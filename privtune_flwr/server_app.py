"""The cloud: a Flower ServerApp that runs :class:`strategies.SplitLearningStrategy`."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from strategies import SplitLearningStrategy

from . import data
from .accounting import is_finite_number, run_summary, statement_for_config
from .cloud import CloudSide
from .config import RunConfig
from .models import load_split

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

    statement = statement_for_config(cfg, radius=worst("shift-radius") or 0.0)
    return run_summary(statement, max_tokens=cfg.max_length, train_releases=worst("releases-per-example-max"),
                       test_releases=worst("test-releases-per-example-max"))


def _console_log() -> None:
    """Round lines on the console, without switching on every library's INFO logging."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[cloud] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.perf_counter()
    cfg = RunConfig.from_flower(context.run_config)
    _console_log()
    # The number of classes is task metadata the cloud must know to build its head.
    num_labels = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=cfg.max_examples or None).num_labels
    split = load_split(cfg.model, cfg.split_layer, cfg.task, num_labels, lora_rank=cfg.lora_rank, seed=cfg.seed)
    cloud = CloudSide(split, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed)
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    strategy = SplitLearningStrategy(cloud, cfg, output_dir=out)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: v.contiguous() for k, v in split.trainable_state().items()}),
        num_rounds=cfg.num_rounds,
        timeout=cfg.timeout,
    )
    history = strategy.history
    final = history[-1] if history else {}
    summary = {
        "config": cfg.to_flower(),
        "rounds": history,
        "rejected-replies": strategy.rejected,
        "final": {
            "test-accuracy": final.get("test-accuracy"),
            "test-macro-f1": final.get("test-macro-f1"),
            "self-audit-knn": final.get("self-audit-knn"),
            "cloud-steps": cloud.steps,
        },
        "privacy": privacy_summary(cfg, history),
        "wall-seconds": time.perf_counter() - t0,
        "server-peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable-parameters": sum(v.numel() for v in split.trainable_state().values()),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    log.info("summary: %s", json.dumps(summary["final"]))
    log.info("results written to %s", out / "results.json")
