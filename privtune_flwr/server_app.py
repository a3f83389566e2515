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
from .config import RunConfig
from .models import load_split
from .training import CloudSide

log = logging.getLogger("privtune_flwr.cloud")
app = ServerApp()


def privacy_summary(cfg: RunConfig, history: list[dict]) -> dict:
    """The run's privacy statement (spec 2.6): per token, per sequence, and composed over releases.

    Each release of a sequence adds its per-sequence parameter again (fresh noise, basic
    composition), so the worst case over the run is the per-sequence maximum times the largest
    number of releases of one example, taken separately for training and test examples.
    """
    if cfg.defense == "none":
        return {"defense": "none", "guarantee": "none: representations are released unperturbed"}

    def worst(key: str) -> float | None:
        values = [r[key] for r in history if r.get(key) is not None]
        return max(values) if values else None

    def composed(prefix: str) -> float | None:
        pairs = [(r.get(f"{prefix}epsilon-per-sequence-max"), r.get(f"{prefix}releases-per-example-max")) for r in history]
        values = [e * n for e, n in pairs if e is not None and n is not None]
        return max(values) if values else None

    last = history[-1] if history else {}
    return {
        "defense": cfg.defense,
        "epsilon": cfg.epsilon,
        "guarantee": (
            f"(epsilon, delta={cfg.delta:g}) Gaussian mechanism per token, basic composition"
            if cfg.defense == "gaussian"
            else "metric (d_chi-style) privacy per token; see the README's privacy section"
        ),
        "effective-epsilon-per-token": {
            "min": last.get("epsilon-effective-min"),
            "median": last.get("epsilon-effective-median"),
            "max": worst("epsilon-effective-max"),
        },
        "slack-per-token-max": worst("slack-max"),
        "epsilon-per-sequence-max": worst("epsilon-per-sequence-max"),
        "slack-per-sequence-max": worst("slack-per-sequence-max"),
        "releases-per-train-example-max": worst("releases-per-example-max"),
        "releases-per-test-example-max": worst("test-releases-per-example-max"),
        "epsilon-per-train-sequence-composed-max": composed(""),
        "epsilon-per-test-sequence-composed-max": composed("test-"),
        "composition": "per token as stated; adds up over the tokens of a sequence and over every release of it",
    }


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
