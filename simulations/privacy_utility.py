"""Privacy-utility sweep: utility at convergence against attack success, per defence, ε and seed.

``python -m simulations.privacy_utility [--quick | --headline | --all-datasets | --generation | --floors] --out DIR
[--datasets a,b] [--defenses ...] [--epsilons ...] [--attacks ...] [--seeds 0,1,2] [--max-examples N]
[--max-steps N] [--patience N] [--eval-every N] [--model NAME|FOLDER] [--threads N]``

For every (dataset, defence, ε, seed) point it

1. holds a validation split out of the device's training data (``validation_fraction``, stratified),
   builds the defence as the device does (from its own training part only) and fine-tunes the cloud
   top with the same :class:`DeviceSide`/:class:`CloudSide` code as the Flower app until the
   validation score stops improving (:func:`fine_tune_to_convergence`: scored every
   ``eval_every`` steps, stops after ``patience`` scores without a new best or at ``max_steps``,
   keeps the best weights); the row reports the steps used;
2. scores utility on the victim test split released through the defence (``utility_metric`` is
   accuracy for balanced sets, macro-F1 for the unbalanced drug_reviews / political_debates, and
   ROUGE-L of greedy continuations for the generation tasks, with the test perplexity beside it:
   those train SmolLM2's middle and the device's head together on the u-shaped protocol,
   :func:`generation_utility`);
3. runs the spec §4 attacks (:func:`privtune_flwr.attacks.run_attacks`) under both attacker
   protocols: ``adaptive`` (aux data released through the same bottom and defence) and ``static``
   (aux data released clean); every row carries its ``protocol``, and ``asr_clean`` (the clean
   attacker on the clean victim release).

Noise is seeded (``seed=`` of the defence), so every point is reproducible; each row's privacy
statement says so (REPRODUCIBLE NOISE). A device's own noise comes from a secret key instead.

Auxiliary data (a *different* dataset from the victim's; spec §4):

=================== ================== ========================================================
victim              aux (all attacks)  AIA-1 attribute (aux for it)
=================== ================== ========================================================
rotten_tomatoes     imdb               genre class (genre_attribute), falls back to sentiment
imdb                rotten_tomatoes    genre class, falls back to sentiment
bbc_news            political_speeches topic (no other corpus has it: aux = bbc_news *train*
                                       rows, disjoint from the victim test split)
drug_reviews        imdb               condition, top-5 (aux = drug_reviews *train* rows)
political_debates   political_speeches party (democrat / republican; moderators left out)
political_speeches  political_debates  party
bbc_headlines       political_speeches topic (bbc_headlines *train* rows)
*_continuation      as its review corpus (rotten_tomatoes / imdb)
=================== ================== ========================================================

When the auxiliary corpus lacks the attribute, AIA-1 alone is trained on the victim dataset's
own train split (never its test split); the row's ``attack_aux`` says which aux each attack used.

Grids: ``--quick`` is a small smoke grid; ``--headline`` is the README's Rotten Tomatoes frontier
(every defence over the ε grid at seed 0, the headline points at three seeds); ``--all-datasets``
the other four datasets at the headline ε; ``--generation`` BBC headlines (or ``--datasets`` of
``GENERATION_DATASETS``) with ``none``, ``dchi`` and ``privtune`` at the headline ε; the default is
the full grid of ``FULL_*`` (hours).

Resumable: each finished point is written atomically to
``DIR/points/<dataset>__<defense>__<eps>__s<seed>.json`` (with a fingerprint of its settings; a
rerun with the same settings skips it). ``results.json``/``.csv`` (one row per point, attack and
protocol), ``summary.json``/``.csv`` (mean and sd over seeds, the drop against ``none`` of the same
seed, the target check) and ``<dataset>_<protocol>.png`` (the frontiers) are rebuilt from the point
files at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from privtune_flwr import data
from privtune_flwr.attacks import ATTACKS, PROTOCOLS, run_attacks
from privtune_flwr.attacks.keywords import GENERIC_KEYWORDS, MOVIE_GENRE_KEYWORDS, genre_attribute, top_classes
from privtune_flwr.config import SUBSPACE_FITS, RunConfig
from privtune_flwr.defenses import DEFENSES
from privtune_flwr.models import LORA_TARGET_CHOICES, load_split
from privtune_flwr.cloud import CloudSide, MiddleSide
from privtune_flwr.device import DeviceHead, DeviceSide, device_defense, generated_text, mean_rouge_l
from simulations.training import (ReleasedSet, StopRule, evaluate_set, fine_tune_to_convergence,
                                  fine_tune_u_shaped_to_convergence, u_shaped_generate, u_shaped_perplexity)

# victim -> auxiliary corpus for the attacks (always a different dataset).
AUX_PAIRS: dict[str, str] = {
    "rotten_tomatoes": "imdb",
    "imdb": "rotten_tomatoes",
    "bbc_news": "political_speeches",
    "drug_reviews": "imdb",
    "political_debates": "political_speeches",
    "political_speeches": "political_debates",
    # generation (SmolLM2, u-shaped): the aux of the corpus each task is made from
    "bbc_headlines": "political_speeches",
    "rotten_tomatoes_continuation": "imdb",
    "imdb_continuation": "rotten_tomatoes",
}
# a generation task's attributes and keywords are those of the corpus it is made from
SOURCE = {"bbc_headlines": "bbc_news", "rotten_tomatoes_continuation": "rotten_tomatoes", "imdb_continuation": "imdb"}
GENERATION_DATASETS = tuple(SOURCE)
# SweepSettings fields that only generation points use (left out of a classification point's fingerprint)
GENERATION_SETTINGS = {"generation_model", "generation_split_layer", "generation_max_length", "max_new_tokens",
                       "max_generate"}
SWEEP_DATASETS = tuple(AUX_PAIRS)
UNBALANCED = ("drug_reviews", "political_debates")  # utility = macro-F1
SWEEP_DEFENSES = tuple(DEFENSES)
ABLATIONS = ("privtune-noimp", "privtune-nomean", "privtune-random-target", "privtune-sampled-target")

QUICK_DATASETS = ("rotten_tomatoes", "political_debates")
QUICK_DEFENSES = ("none", "dchi", "gaussian", "privtune")
QUICK_EPSILONS = (16.0, 32.0, 64.0)
QUICK_ATTACKS = ("eia-knn", "aia-attribute", "aia-keyword", "aia-bow")  # eia-mlp/-context: --attacks
QUICK_ATTACK_OPTIONS = {
    "eia-mlp": {"hidden": 256, "epochs": 3, "vocab_cap": 5000},
    "eia-context": {"width": 128, "epochs": 4},
    "aia-attribute": {"epochs": 30},
    "aia-keyword": {"epochs": 30},
    "aia-bow": {"epochs": 30},
}
FULL_DATASETS = ("rotten_tomatoes", "imdb", "bbc_news", "drug_reviews", "political_debates")
FULL_DEFENSES = ("none", "dchi", "gaussian", "privtune")
FULL_EPSILONS = (8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0)
FULL_ATTACKS = ATTACKS
PARTY_CLASSES = ["democrat", "republican"]

# The targets of a defence that protects against the adaptive attacker (README, "Targets").
TARGET_DROP = 0.0333  # relative utility drop against `none` at convergence
TARGET_INVERSION = 0.10  # EIA-1/EIA-2 top-1 token recovery
TARGET_MARGIN = 0.05  # EIA-3 above its blind floor; each AIA above its majority / chance / blind rate


# The sweep's settings start from the app's own defaults (RunConfig); these are the named ways a
# sweep point differs from the app (one process trains each point, at split 1, with a higher
# learning rate, on at most 2,000 examples per split of the victim corpus). A setting below that mirrors a RunConfig field takes its default
# from SWEEP_RUN, so no default is kept twice.
SWEEP_OVERRIDES = {"split_layer": 1, "subspace_rank": 1, "learning_rate": 3e-3, "max_examples": 2000}
SWEEP_RUN = replace(RunConfig(), **SWEEP_OVERRIDES)


@dataclass
class SweepSettings:
    datasets: tuple[str, ...] = QUICK_DATASETS
    defenses: tuple[str, ...] = QUICK_DEFENSES
    epsilons: tuple[float, ...] = QUICK_EPSILONS
    attacks: tuple[str, ...] = QUICK_ATTACKS
    attack_options: dict = field(default_factory=lambda: dict(QUICK_ATTACK_OPTIONS))
    seeds: tuple[int, ...] = (0,)
    protocols: tuple[str, ...] = PROTOCOLS
    max_steps: int = 150  # cap on optimiser steps per point
    patience: int = 2  # validation scores without a new best before stopping
    eval_every: int = 50  # optimiser steps between validation scores
    decays: int = 0  # learning-rate decays (x0.3, back to the best weights) before stopping
    validation_fraction: float = 0.1  # of the device's training data, held out for stopping
    batch_size: int = SWEEP_RUN.batch_size
    max_examples: int = SWEEP_RUN.max_examples  # per split of the victim corpus (0 = all)
    max_victim: int = 150  # victim test sequences attacked
    max_utility: int = 0  # victim test sequences scored for utility (0 = the whole test split)
    max_aux: int = 300  # auxiliary sequences the attacker trains on
    max_length: int = SWEEP_RUN.max_length
    learning_rate: float = SWEEP_RUN.learning_rate
    # classification: the model (an offline name such as "minilm", or a local folder holding a
    # supported encoder, e.g. a RoBERTa saved with save_pretrained) is split after this block;
    # label-subspace keeps this many directions.
    # Left out of the fingerprint at these defaults, so points computed before they existed stay valid.
    model: str = SWEEP_RUN.model
    split_layer: int = SWEEP_RUN.split_layer
    subspace_rank: int = SWEEP_RUN.subspace_rank
    subspace_fit: str = SWEEP_RUN.subspace_fit  # label-subspace: "reader" or "closed-form" (left out of the fingerprint at its default)
    # what LoRA adapts in the blocks above the split: "attention" (query/value) or "all" (every linear
    # layer, and the encoder's pooler whole); left out of the fingerprint at its default
    lora_targets: str = SWEEP_RUN.lora_targets
    # generation tasks only (left out of a classification point's fingerprint)
    generation_model: str = "smollm2"
    generation_split_layer: int = 2
    generation_max_length: int = 128  # tokens of prompt + continuation (in place of max_length)
    max_new_tokens: int = SWEEP_RUN.max_new_tokens  # the longest generated continuation
    max_generate: int = 32  # victim test prompts continued greedily and scored by ROUGE-L

    def validate(self) -> None:
        _check_names("dataset", self.datasets, SWEEP_DATASETS)
        _check_names("defense", self.defenses, SWEEP_DEFENSES)
        _check_names("attack", self.attacks, ATTACKS)
        _check_names("protocol", self.protocols, PROTOCOLS)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model={self.model!r} is invalid; accepted: an offline model name or a local model folder")
        bad = sorted(set(self.attack_options) - set(ATTACKS))
        if bad:
            raise ValueError(f"attack options for unknown attacks {bad}; accepted: {', '.join(ATTACKS)}")
        if any(d != "none" for d in self.defenses) and not self.epsilons:
            raise ValueError(f"epsilons={list(self.epsilons)!r} is empty; accepted: one or more finite values > 0")
        for eps in self.epsilons:
            if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
                raise ValueError(f"epsilon={eps!r} is invalid; accepted: a finite value > 0")
        if not self.seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds):
            raise ValueError(f"seeds={list(self.seeds)!r} is invalid; accepted: one or more integers >= 0")
        if self.lora_targets not in LORA_TARGET_CHOICES:
            raise ValueError(f"lora_targets={self.lora_targets!r} is invalid; accepted: {', '.join(LORA_TARGET_CHOICES)}")
        if self.subspace_fit not in SUBSPACE_FITS:
            raise ValueError(f"subspace_fit={self.subspace_fit!r} is invalid; accepted: {', '.join(SUBSPACE_FITS)}")
        if not isinstance(self.decays, int) or self.decays < 0:
            raise ValueError(f"decays={self.decays!r} is invalid; accepted: an integer >= 0")
        for key in ("max_steps", "patience", "eval_every", "batch_size", "max_victim", "max_aux", "max_length",
                    "split_layer", "subspace_rank", "generation_split_layer", "generation_max_length", "max_new_tokens",
                    "max_generate"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid; accepted: an integer >= 1")
        for key in ("max_examples", "max_utility"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid; accepted: an integer >= 0 (0 = all)")
        if self.max_new_tokens >= self.generation_max_length:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid; accepted: 1 .. generation_max_length - 1 "
                             f"({self.generation_max_length - 1}), so a prompt keeps at least one token")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction={self.validation_fraction!r} is invalid; accepted: (0, 1)")

    def length_for(self, dataset: str) -> int:
        """The most tokens a device releases per sequence on ``dataset``."""
        return self.generation_max_length if dataset in GENERATION_DATASETS else self.max_length

    @property
    def stop_rule(self) -> StopRule:
        return StopRule(patience=self.patience, eval_every=self.eval_every, max_steps=self.max_steps, decays=self.decays)

    def fingerprint(self, dataset: str, seed: int) -> str:
        """Settings that change a point's rows (the dataset/defence/ε/seed lists do not)."""
        skip = {"datasets", "defenses", "epsilons", "seeds"}
        if dataset not in GENERATION_DATASETS:
            skip |= GENERATION_SETTINGS
        else:
            skip |= {"model", "split_layer", "subspace_rank", "subspace_fit"}  # classification only
        skip |= {k for k, default in SPLIT_DEFAULTS.items() if getattr(self, k) == default}
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        keep.update(dataset=dataset, aux=AUX_PAIRS[dataset], seed=seed, version=2)
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# left out of a point's fingerprint at these values, so that points stored before they were settings stay valid
SPLIT_DEFAULTS = {k: getattr(SWEEP_RUN, k) for k in ("model", "split_layer", "subspace_rank", "lora_targets", "subspace_fit")}


def quick_settings(**overrides) -> SweepSettings:
    return SweepSettings(**overrides)


def full_settings(**overrides) -> SweepSettings:
    base = dict(datasets=FULL_DATASETS, defenses=FULL_DEFENSES, epsilons=FULL_EPSILONS, attacks=FULL_ATTACKS,
                attack_options={}, max_steps=4000, patience=4, eval_every=100, max_examples=0, max_victim=1000,
                max_aux=2000, learning_rate=1e-3)
    base.update(overrides)
    return SweepSettings(**base)


# The README's headline settings: all six attacks at the sizes below, both protocols, every point
# fine-tuned to convergence (scored every 100 steps, patience 4, at most 4,000 steps of 16).
HEADLINE_COMMON = dict(
    datasets=("rotten_tomatoes",), max_victim=500, max_aux=1000, learning_rate=1e-3, max_examples=0,
    max_steps=4000, patience=4, eval_every=100,
    attack_options={"eia-mlp": {"hidden": 1024, "epochs": 3, "vocab_cap": 4000}, "eia-context": {"width": 128, "epochs": 4},
                    "aia-attribute": {"epochs": 30}, "aia-keyword": {"epochs": 30}, "aia-bow": {"epochs": 30}},
)
HEADLINE_EPSILON = 64.0
HEADLINE_SEEDS = (0, 1, 2)
# (defences, epsilons, seeds): the headline points at three seeds, the frontier over the full ε
# grid and the ablations at seed 0.
HEADLINE_GRID = (
    (("none", "dchi", "gaussian", "privtune"), (HEADLINE_EPSILON,), HEADLINE_SEEDS),
    (("dchi", "gaussian", "privtune"), FULL_EPSILONS, (0,)),
    (ABLATIONS, (HEADLINE_EPSILON,), (0,)),
)
# The other datasets at the headline ε, seed 0; same settings, so a shared ``out`` reuses points.
DATASETS_GRID = ((("none", "dchi", "gaussian", "privtune"), (HEADLINE_EPSILON,), (0,)),)
# Generation (SmolLM2 split after block 2, u-shaped): BBC headlines by default, the same six attacks
# at the headline's attack settings on fewer texts: a step of 8 x 128 tokens took about 23 s on a loaded
# core (6,875 s for 300 steps, `none` on BBC headlines), a MiniLM headline step about 1.6 s (1,252 s for 800).
GENERATION_COMMON = dict(max_examples=600, max_victim=100, max_aux=300, batch_size=8, learning_rate=5e-4,
                         max_steps=400, eval_every=50, patience=2)
GENERATION_GRID = ((("none", "dchi", "privtune"), (HEADLINE_EPSILON,), (0,)),)


def headline(out: Path, *, progress: bool = True, grid=HEADLINE_GRID, datasets=("rotten_tomatoes",),
             rescore: bool = False, **overrides) -> list[dict]:
    """Run (or resume) ``grid`` (triples of defences, epsilons and seeds) on ``datasets`` at the
    headline sizes (``overrides``: other settings, e.g. ``max_steps``) into ``out``; the results
    cover every point of the grid. ``rescore``: re-run only the attacks of the stored points
    (:func:`rescore_attacks`)."""
    rows: list[dict] = []
    common = {**HEADLINE_COMMON, **overrides, "datasets": tuple(datasets)}
    for defenses, epsilons, seeds in grid:
        rows += sweep(full_settings(defenses=defenses, epsilons=epsilons, seeds=tuple(seeds), **common), out,
                      plots=False, progress=progress, rescore=rescore)["rows"]
    seen, unique = set(), []
    for r in rows:  # a point listed by several sub-grids is kept once
        key = (r["dataset"], r["defense"], r["epsilon"], r["seed"], r["attack"], r["protocol"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    write_results(unique, Path(out))
    plot(summarise(unique), Path(out))
    return unique


def _check_names(kind: str, values, accepted) -> None:
    values = list(values)
    if not values:
        raise ValueError(f"{kind} list is empty; accepted: {', '.join(accepted)}")
    for v in values:
        if v not in accepted:
            raise ValueError(f"{kind}={v!r} is unknown; accepted: {', '.join(accepted)}")


# ------------------------------------------------------------------------------------------------
# Attribute and keyword choice per dataset
# ------------------------------------------------------------------------------------------------


def _party(value: str) -> str:
    v = str(value).strip().lower()
    for p in PARTY_CLASSES:
        if v.startswith(p):
            return p
    return v


def _sample(split_ds, n: int, seed: int):
    if len(split_ds) == 0:
        raise ValueError("dataset split is empty")
    idx = list(range(len(split_ds)))
    random.Random(seed).shuffle(idx)
    return split_ds.select(sorted(idx[:n]))


def attack_inputs(name: str, ds: data.TextDataset, victim, settings: SweepSettings, seed: int = 0) -> dict:
    """Aux texts, attributes and keywords for the attacks on victim ``name``.

    Returns ``{"aux_name", "aux_texts", "attribute", "aux_attr", "victim_attr", "keywords",
    "attr_aux_name", "attr_aux_texts"}``; ``attr_aux_*`` is set only when AIA-1 needs its own aux.
    """
    aux_name = AUX_PAIRS[name]
    source = SOURCE.get(name, name)  # a generation task: its corpus's attributes and keywords
    aux_ds = data.load_dataset(aux_name, seed=seed, max_examples=max(settings.max_aux, 1))
    aux = _sample(aux_ds.train, settings.max_aux, seed + 1)
    out = {"aux_name": aux_name, "aux_texts": list(aux["text"]), "attr_aux_name": None, "attr_aux_texts": None}
    vtexts = list(victim["text"])
    if source in ("rotten_tomatoes", "imdb"):
        out["keywords"] = list(MOVIE_GENRE_KEYWORDS)
        a, _ = genre_attribute(out["aux_texts"])
        v, _ = genre_attribute(vtexts)
        if int((v >= 0).sum()) >= 10 and a[a >= 0].unique().numel() >= 2:
            out.update(attribute="genre", aux_attr=a, victim_attr=v)
        else:  # short sentences rarely name a genre: fall back to the sentiment label
            out.update(attribute="sentiment", aux_attr=torch.tensor(list(aux["label"])),
                       victim_attr=torch.tensor(list(victim["label"])))
    elif source in ("political_debates", "political_speeches"):
        out["keywords"] = list(GENERIC_KEYWORDS)
        a, _ = top_classes([_party(p) for p in aux["party"]], 2, classes=PARTY_CLASSES)
        v, _ = top_classes([_party(p) for p in victim["party"]], 2, classes=PARTY_CLASSES)
        out.update(attribute="party", aux_attr=a, victim_attr=v)
    else:  # bbc_news: topic; drug_reviews: condition: only the victim corpus carries them
        column = "topic" if source == "bbc_news" else "condition"
        out["keywords"] = list(GENERIC_KEYWORDS)
        own = _sample(ds.train, settings.max_aux, seed + 2)
        values = list(own[column])
        if column == "condition":
            values = [v if v != data.UNKNOWN else "" for v in values]
        a, classes = top_classes(values, 5)
        classes = [c for c in classes if c]
        a, _ = top_classes(values, 5, classes=classes)
        v, _ = top_classes(list(victim[column]), 5, classes=classes)
        out.update(attribute=column, aux_attr=a, victim_attr=v, attr_aux_name=f"{name}:train",
                   attr_aux_texts=list(own["text"]))
    return out


# ------------------------------------------------------------------------------------------------
# One point
# ------------------------------------------------------------------------------------------------


def classification_utility(name: str, split, defense, train, validation, test, settings: SweepSettings, seed: int) -> dict:
    """Fine-tune the classifier top to convergence on releases of ``train`` (stopping on
    ``validation``); score it on the release of ``test``."""
    metric = "macro-f1" if name in UNBALANCED else "accuracy"
    device = DeviceSide(split, defense, max_length=settings.max_length, audit_tokens=0)
    cloud = CloudSide(split, learning_rate=settings.learning_rate, batch_size=settings.batch_size, seed=seed)
    run = fine_tune_to_convergence(device, cloud, train, validation, settings.stop_rule, seed=seed, metric=metric)
    scores = evaluate_set(cloud, ReleasedSet(device, test["text"], test["label"]))
    return {"utility_metric": metric, "utility": float(scores[metric]), "accuracy": float(scores["accuracy"]),
            "macro_f1": float(scores["macro-f1"]), "utility_examples": len(test), "steps": run["steps"],
            "best_step": run["best_step"], "stopped_by": run["stopped_by"], "epochs": run["epochs"],
            "best_validation": run["best_validation"], "final_train_loss": run["final_train_loss"], "decays": run["decays"],
            "validation_curve": ";".join(f"{s}:{v:.4f}" for s, v, _ in run["history"])}


def generation_utility(name: str, split, defense, train, validation, test, settings: SweepSettings, seed: int) -> dict:
    """Fine-tune the cloud's middle and the device's head together on the u-shaped protocol
    (generation: the targets are the text, so they never leave the device) until the validation
    perplexity stops improving; score the perplexity of the released test sequences and the
    ROUGE-L of greedy continuations of the first ``max_generate`` test prompts against their
    references (``utility`` is ROUGE-L)."""
    length = settings.length_for(name)
    device = DeviceSide(split, defense, max_length=length, audit_tokens=0)
    middle = MiddleSide(split, learning_rate=settings.learning_rate)
    head = DeviceHead(split, learning_rate=settings.learning_rate)
    run = fine_tune_u_shaped_to_convergence(device, middle, head, train["text"], validation["text"], settings.stop_rule,
                                            batch_size=settings.batch_size, seed=seed)
    scores = u_shaped_perplexity(middle, head, ReleasedSet(device, test["text"]))
    rows = test.select(range(min(settings.max_generate, len(test))))
    budget = length - settings.max_new_tokens
    prompts = [ids[-budget:] for ids in device.encode(rows["prompt"])]
    generated = u_shaped_generate(device, middle, head, prompts, settings.max_new_tokens)
    texts = [generated_text(split.tokenizer, seq, len(p)) for seq, p in zip(generated, prompts)]
    rouge = mean_rouge_l(list(rows["target"]), texts)
    return {"utility_metric": "rouge-l", "utility": rouge, "rouge_l": rouge, "perplexity": scores["perplexity"],
            "utility_examples": len(rows), "perplexity_tokens": scores["tokens"], "steps": run["steps"],
            "best_step": run["best_step"], "stopped_by": run["stopped_by"], "epochs": run["epochs"],
            "best_validation": run["best_validation"], "final_train_loss": run["final_train_loss"], "decays": run["decays"],
            "validation_curve": ";".join(f"{s}:{v:.4f}" for s, v, _ in run["history"]),
            "generated_example": texts[0] if texts else ""}


# Utility scorer per task: ``(name, split, defense, train, validation, test, settings, seed) ->
# {"utility_metric", "utility", "steps", ...}``; the attacks only see token releases.
UTILITY = {"classification": classification_utility, "generation": generation_utility}


@dataclass
class DatasetContext:
    """Everything a point of one (dataset, seed) shares: the data, the attack inputs, the split."""

    name: str
    seed: int
    ds: data.TextDataset
    train: object  # the device's training part
    validation: object  # held out from the device's training data, for stopping only
    test: object  # scored for utility
    victim: object  # attacked
    inputs: dict
    split: object
    initial_state: dict
    initial_head: dict = field(default_factory=dict)  # u-shaped: the device's head


def _joined(name: str, rows):
    """A generation split as the device trains on it: ``text`` is prompt + continuation (what it
    releases), with ``prompt`` and ``target`` kept for scoring."""
    pairs = [data.generation_pair(name, t, g) for t, g in zip(rows["text"], rows["target"])]
    return rows.remove_columns("text").add_column("text", [p + c for p, c in pairs]).add_column("prompt", [p for p, _ in pairs])


def point_data(name: str, seed: int, settings: SweepSettings):
    """A point's data: ``(ds, train, validation, test, victim)``: the device's training part, the
    part held out of it for stopping, the test split scored for utility and the test sequences
    attacked (generation: ``text`` is prompt + continuation, :func:`_joined`)."""
    ds = data.load_dataset(name, seed=seed, max_examples=settings.max_examples or None)
    if len(ds.train) == 0 or len(ds.test) == 0:
        raise ValueError(f"dataset={name!r} has an empty split (train {len(ds.train)}, test {len(ds.test)})")
    if ds.task == data.GENERATION:
        ds = data.TextDataset(ds.name, ds.task, _joined(name, ds.train), _joined(name, ds.test), ds.label_names,
                              ds.attributes)
    # stratified by the label, or (generation) by the label or topic the task keeps
    column = "label" if "label" in ds.train.column_names else ds.attributes[0]
    train, validation = data.holdout(ds.train, settings.validation_fraction, seed=seed, label_column=column)
    victim = _sample(ds.test, settings.max_victim, seed)
    test = ds.test if not settings.max_utility else _sample(ds.test, settings.max_utility, seed)
    return ds, train, validation, test, victim


def dataset_context(name: str, seed: int, settings: SweepSettings) -> DatasetContext:
    ds, train, validation, test, victim = point_data(name, seed, settings)
    inputs = attack_inputs(name, ds, victim, settings, seed)
    if ds.task == data.GENERATION:
        split = load_split(settings.generation_model, settings.generation_split_layer, "generation", protocol="u-shaped",
                           seed=seed, lora_targets=settings.lora_targets)
    else:
        split = load_split(settings.model, settings.split_layer, "classification", ds.num_labels, seed=seed,
                           lora_targets=settings.lora_targets)
    return DatasetContext(name, seed, ds, train, validation, test, victim, inputs, split, split.trainable_state(),
                          split.head_state())


def make_defense(defense_name: str, eps: float | None, ctx: DatasetContext, settings: SweepSettings):
    """The defence as the device builds it from its own training part, with seeded (stated) noise."""
    options = RunConfig(defense=defense_name, seed=ctx.seed, max_length=settings.length_for(ctx.name),
                        subspace_rank=settings.subspace_rank, subspace_fit=settings.subspace_fit).defense_options()
    return device_defense(defense_name, ctx.split, epsilon=None if eps is None else float(eps),
                          texts=ctx.train["text"], labels=ctx.train["label"] if ctx.ds.task == data.CLASSIFICATION else None,
                          task=ctx.ds.task,
                          max_length=settings.length_for(ctx.name), seed=ctx.seed, **options)


def run_point(defense_name: str, eps: float | None, ctx: DatasetContext, settings: SweepSettings, *,
              defense=None, stored_utility: dict | None = None) -> list[dict]:
    """Fine-tune to convergence, score utility and attack one (dataset, defence, ε, seed) point under
    every protocol of ``settings``; returns its rows (one per attack and protocol).

    ``defense``: a ready-made defence module to use instead of building ``defense_name`` (for
    experimental variants outside the registry); rows still carry ``defense_name``.
    ``stored_utility``: the utility fields (and ``train_seconds``) of an earlier run of this very
    point; fine-tuning is skipped and only the attacks run (see :func:`rescore_attacks`).
    """
    t0 = time.perf_counter()
    name, seed, split = ctx.name, ctx.seed, ctx.split
    torch.manual_seed(seed)
    split.load_trainable_state(ctx.initial_state)  # every point starts from the same top
    if ctx.initial_head:
        with torch.no_grad():
            for k, p in split.head.named_parameters():
                if k in ctx.initial_head:
                    p.copy_(ctx.initial_head[k])
    if defense is None:
        defense = make_defense(defense_name, eps, ctx, settings)
    if ctx.ds.task not in UTILITY:
        raise ValueError(f"dataset={name!r} is a {ctx.ds.task} task; the sweep scores: {', '.join(UTILITY)}")
    if stored_utility is None:
        utility = UTILITY[ctx.ds.task](name, split, defense, ctx.train, ctx.validation, ctx.test, settings, seed)
        t_train = time.perf_counter() - t0
    else:
        utility = {k: v for k, v in stored_utility.items() if k != "train_seconds"}
        t_train = float(stored_utility["train_seconds"])

    statement = defense.statement()
    privacy = {f"privacy_{k}": v for k, v in statement.to_dict().items()
               if k not in ("defense", "epsilon") and (v is None or isinstance(v, (int, float, str, bool)))}
    privacy["privacy_scales"] = ",".join(f"{s:g}" for s in statement.scales)

    inputs = ctx.inputs
    attacks = list(settings.attacks)
    attr_separate = inputs["attr_aux_texts"] is not None and "aia-attribute" in attacks
    main_names = [a for a in attacks if not (attr_separate and a == "aia-attribute")]
    opts = settings.attack_options
    common = dict(keywords=inputs["keywords"], max_length=settings.length_for(name), seed=seed,
                  protocols=tuple(settings.protocols))
    results: list[tuple[dict, str]] = []
    if main_names:
        # The attribute labels belong to the aux AIA-1 trains on: only passed when that is this aux.
        with_attr = "aia-attribute" in main_names
        res = run_attacks(split, defense, inputs["aux_texts"], list(ctx.victim["text"]),
                          aux_attributes={inputs["attribute"]: inputs["aux_attr"]} if with_attr else None,
                          victim_attributes={inputs["attribute"]: inputs["victim_attr"]} if with_attr else None,
                          attribute=inputs["attribute"] if with_attr else None, names=main_names,
                          options={k: v for k, v in opts.items() if k in main_names}, **common)
        results += [(r, inputs["aux_name"]) for r in res]
    if attr_separate:
        res = run_attacks(split, defense, inputs["attr_aux_texts"], list(ctx.victim["text"]),
                          aux_attributes={inputs["attribute"]: inputs["aux_attr"]},
                          victim_attributes={inputs["attribute"]: inputs["victim_attr"]},
                          attribute=inputs["attribute"], names=["aia-attribute"],
                          options={k: v for k, v in opts.items() if k == "aia-attribute"}, **common)
        results += [(r, inputs["attr_aux_name"]) for r in res]
    seconds = time.perf_counter() - t0 if stored_utility is None else t_train + time.perf_counter() - t0
    base = {
        "dataset": name, "defense": defense_name, "epsilon": None if defense_name == "none" else float(eps),
        "seed": seed, **utility, "victim_examples": len(ctx.victim), "train_seconds": t_train,
        "point_seconds": seconds, "attribute": inputs["attribute"],
        "model": settings.generation_model if ctx.ds.task == data.GENERATION else settings.model,
        "split_layer": settings.generation_split_layer if ctx.ds.task == data.GENERATION else settings.split_layer,
        "lora_targets": settings.lora_targets,
    }
    rows = []
    order_index = {(a, p): i for i, (a, p) in enumerate((a, p) for a in attacks for p in settings.protocols)}
    for r, aux_used in sorted(results, key=lambda x: order_index[(x[0]["attack"], x[0]["protocol"])]):
        extras = {f"attack_{k}": v for k, v in r.items()
                  if k not in ("attack", "asr", "asr_clean", "defense", "epsilon", "seconds", "clean", "protocol")
                  and (v is None or isinstance(v, (int, float, str, bool)))}
        rows.append({**base, "attack": r["attack"], "protocol": r["protocol"], "asr": float(r["asr"]),
                     "asr_clean": float(r["asr_clean"]), "attack_aux": aux_used, "attack_seconds": float(r["seconds"]),
                     **extras, **privacy})
    return rows


# ------------------------------------------------------------------------------------------------
# Sweep, storage, outputs
# ------------------------------------------------------------------------------------------------


def point_path(out: Path, dataset: str, defense: str, eps: float | None, seed: int) -> Path:
    tag = "none" if eps is None else f"{eps:g}"
    return out / "points" / f"{dataset}__{defense}__{tag}__s{seed}.json"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_point(path: Path, fingerprint: str) -> list[dict] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("fingerprint") != fingerprint:
        return None
    return stored["rows"]


# Keys of a stored row that are not the utility of its point: the point's identity and timing, and
# everything that belongs to one attack row.
_POINT_KEYS = {"dataset", "defense", "epsilon", "seed", "victim_examples", "point_seconds", "attribute", "model", "split_layer",
               "lora_targets", "attack", "protocol", "asr", "asr_clean"}


def stored_utility_of(rows: list[dict]) -> dict:
    """The utility fields (and ``train_seconds``) shared by every row of a stored point."""
    if not rows:
        raise ValueError("a stored point has no rows; it cannot be rescored")
    first = rows[0]
    return {k: v for k, v in first.items()
            if k not in _POINT_KEYS and not k.startswith("attack_") and not k.startswith("privacy_")}


def rescore_attacks(settings: SweepSettings, out: Path, *, progress: bool = True) -> dict:
    """Re-run the attacks of stored points whose fingerprint matches ``settings``, keeping their
    measured utility. For when the attacks change and the fine-tuning does not: every attack reads
    the frozen bottom's release through the defence (built again from the same seed), never the
    fine-tuned top, so a point's utility stands. A point that is missing or was stored under other
    settings is refused, never trained. Returns :func:`sweep`'s result (every point ``computed``)."""
    return sweep(settings, out, plots=False, progress=progress, rescore=True)


def points_of(settings: SweepSettings) -> list[tuple[str, str, float | None, int]]:
    pts = []
    for name in settings.datasets:
        for seed in settings.seeds:
            for d in settings.defenses:
                if d == "none":
                    pts.append((name, d, None, seed))
                else:
                    pts += [(name, d, float(e), seed) for e in settings.epsilons]
    return pts


def sweep(settings: SweepSettings, out: Path, *, plots: bool = True, progress: bool = True,
          rescore: bool = False) -> dict:
    """Run every missing point, then rebuild results, summary and plots. Returns rows and counts.
    ``rescore``: every point must be stored already; its attacks run again on its stored utility
    (:func:`rescore_attacks`)."""
    settings.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pts = points_of(settings)
    computed, skipped = [], []
    all_rows: list[dict] = []
    bar = tqdm(total=len(pts), desc="privacy-utility points", unit="point", disable=not progress)
    for name in settings.datasets:
        for seed in settings.seeds:
            fp = settings.fingerprint(name, seed)
            todo = []
            for p in (p for p in pts if p[0] == name and p[3] == seed):
                rows = _load_point(point_path(out, *p), fp)
                if rescore and rows is None:
                    raise ValueError(f"point {p} has no stored result under these settings in {out / 'points'}; "
                                     "--rescore-attacks only re-scores stored points (run the sweep to compute it)")
                if rescore:
                    todo.append((p, stored_utility_of(rows)))
                elif rows is None:
                    todo.append((p, None))
                else:
                    skipped.append(p)
                    all_rows += rows
                    bar.update(1)
            if not todo:
                continue
            ctx = dataset_context(name, seed, settings)
            for p, stored in todo:
                bar.set_postfix_str(f"{p[0]} {p[1]} eps={p[2]} seed={p[3]}")
                rows = run_point(p[1], p[2], ctx, settings, stored_utility=stored)
                record = {"fingerprint": fp, "point": list(p), "rows": rows}
                if stored is not None:
                    record["attacks_rescored"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                _atomic_write(point_path(out, *p), json.dumps(record, indent=1))
                computed.append(p)
                all_rows += rows
                bar.update(1)
    bar.close()
    key = {p: i for i, p in enumerate(pts)}
    all_rows.sort(key=lambda r: key.get((r["dataset"], r["defense"], r["epsilon"], r["seed"]), len(key)))
    write_results(all_rows, out)
    if plots:
        plot(summarise(all_rows), out)
    return {"rows": all_rows, "computed": computed, "skipped": skipped}


def _write_table(rows: list[dict], out: Path, stem: str, *, with_json: bool = True) -> None:
    if with_json:
        _atomic_write(out / f"{stem}.json", json.dumps(rows, indent=1))
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f"{stem}.csv", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / f"{stem}.csv")


def write_results(rows: list[dict], out: Path) -> None:
    """``results.json``/``.csv`` (every row) and ``summary.json``/``.csv`` (:func:`summarise`)."""
    _write_table(rows, out, "results")
    _write_table(summarise(rows), out, "summary")


# The rate a guess that ignores the release reaches, per attack (the row field holding it).
FLOOR_FIELDS = {"eia-mlp": "attack_blind_accuracy", "eia-context": "attack_blind_f1",
                "aia-attribute": "attack_majority_rate", "aia-bow": "attack_blind_recall"}


def floor_of(row: dict) -> float | None:
    """The blind / majority / chance rate of ``row``'s attack (EIA-1: the EIA-2 blind token)."""
    if row["attack"] == "aia-keyword":
        return 0.5  # balanced accuracy of any constant guess
    value = row.get(FLOOR_FIELDS.get(row["attack"], ""))
    return None if value is None else float(value)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds per (dataset, defence, ε, attack, protocol), with the relative utility
    drop against ``none`` at the same dataset and seed (``drop`` > 0: the defence loses utility) and
    the floor of each attack (EIA-1 borrows EIA-2's blind token rate from the same point)."""
    none = {(r["dataset"], r["seed"]): r["utility"] for r in rows if r["defense"] == "none"}
    blind_token = {(r["dataset"], r["defense"], r["epsilon"], r["seed"]): r.get("attack_blind_accuracy")
                   for r in rows if r["attack"] == "eia-mlp"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["defense"], r["epsilon"], r["attack"], r["protocol"]), []).append(r)
    out = []
    for (dataset, defense, eps, attack, protocol), mine in groups.items():
        util_m, util_sd = _mean_sd([r["utility"] for r in mine])
        asr_m, asr_sd = _mean_sd([r["asr"] for r in mine])
        # a drop is relative to `none`; undefined where `none` scores 0 (an untrained generator's ROUGE-L)
        drops = [1.0 - r["utility"] / none[(dataset, r["seed"])] for r in mine if none.get((dataset, r["seed"]), 0) > 0]
        drop_m, drop_sd = _mean_sd(drops) if drops else (None, None)
        floors = []
        for r in mine:
            f = floor_of(r) if attack != "eia-knn" else blind_token.get((dataset, defense, eps, r["seed"]))
            if f is not None:
                floors.append(float(f))
        out.append({
            "dataset": dataset, "defense": defense, "epsilon": eps, "attack": attack, "protocol": protocol,
            "seeds": len(mine), "utility_metric": mine[0]["utility_metric"], "utility": util_m, "utility_sd": util_sd,
            "drop": drop_m, "drop_sd": drop_sd, "asr": asr_m, "asr_sd": asr_sd,
            "asr_clean": statistics.fmean(r["asr_clean"] for r in mine),
            "floor": statistics.fmean(floors) if floors else None,
            "steps": statistics.fmean(r["steps"] for r in mine),
            "stopped_by": ",".join(sorted({r["stopped_by"] for r in mine})),
            "point_seconds": statistics.fmean(r["point_seconds"] for r in mine),
            "privacy_guarantee": mine[0].get("privacy_guarantee"),
            # generation: the test perplexity beside the ROUGE-L utility
            "perplexity": statistics.fmean(r["perplexity"] for r in mine) if "perplexity" in mine[0] else None,
        })
    return out


def meets_target(summary: list[dict], dataset: str, defense: str, eps: float | None, protocol: str = "adaptive") -> dict:
    """Which targets the (dataset, defence, ε) point meets under ``protocol``: ``drop`` (relative
    utility drop <= 3.33%), ``eia-knn``/``eia-mlp`` (<= 0.10), ``eia-context`` (within 0.05 of its blind
    floor), each AIA (within 0.05 of its majority / chance / blind rate). Missing attacks are absent."""
    mine = [r for r in summary if (r["dataset"], r["defense"], r["epsilon"], r["protocol"]) == (dataset, defense, eps, protocol)]
    out: dict[str, bool] = {}
    if mine and mine[0]["drop"] is not None:
        out["drop"] = mine[0]["drop"] <= TARGET_DROP
    for r in mine:
        if r["attack"] in ("eia-knn", "eia-mlp"):
            out[r["attack"]] = r["asr"] <= TARGET_INVERSION
        elif r["floor"] is not None:
            out[r["attack"]] = r["asr"] <= r["floor"] + TARGET_MARGIN
    return out


def plot(summary: list[dict], out: Path) -> list[Path]:
    """One figure per dataset and protocol: ASR against utility per attack (means over seeds, with
    sd bars where there are several), one line per defence over ε, the attack's floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in dict.fromkeys(r["dataset"] for r in summary):
        for protocol in dict.fromkeys(r["protocol"] for r in summary if r["dataset"] == name):
            mine = [r for r in summary if r["dataset"] == name and r["protocol"] == protocol]
            attacks = list(dict.fromkeys(r["attack"] for r in mine))
            fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.8), squeeze=False)
            for ax, attack in zip(axes[0], attacks):
                sel = [r for r in mine if r["attack"] == attack]
                for d in dict.fromkeys(r["defense"] for r in sel):
                    pts = sorted((r for r in sel if r["defense"] == d), key=lambda r: r["epsilon"] or 0)
                    xs, ys = [p["utility"] for p in pts], [p["asr"] for p in pts]
                    xerr, yerr = [p["utility_sd"] for p in pts], [p["asr_sd"] for p in pts]
                    if d == "none" or d.startswith("none "):  # "none (split 3)": a reference of another split
                        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="*", ms=12, c="k" if d == "none" else "grey",
                                    label=d, zorder=3)
                        continue
                    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-o", ms=3, lw=1, capsize=2, label=d)
                    for p in pts:
                        ax.annotate(f"{p['epsilon']:g}", (p["utility"], p["asr"]), fontsize=6,
                                    textcoords="offset points", xytext=(2, 2))
                floors = [r["floor"] for r in sel if r["floor"] is not None]
                if floors:
                    ax.axhline(statistics.fmean(floors), ls="--", c="grey", lw=0.8, label="blind / majority")
                ax.set_title(attack, fontsize=9)
                ax.set_xlabel(f"utility ({sel[0]['utility_metric']})")
                ax.set_ylabel("ASR")
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=6)
            fig.suptitle(f"{name}, {protocol} attacker: attack success vs utility at convergence (labels: ε)")
            fig.tight_layout()
            path = out / f"{name}_{protocol}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def blind_floors(settings: SweepSettings) -> list[dict]:
    """What EIA-2 and EIA-3 score by guessing without looking at any release, per dataset.

    Same aux and victim sets as a sweep with ``settings``: ``blind_accuracy`` (the aux corpus's
    most frequent token at every position) and ``blind_f1`` (the aux-chosen frequent token set
    for every sequence, :func:`~privtune_flwr.attacks.inversion.blind_token_set`).
    """
    from privtune_flwr.attacks.base import Released, real_token_mask
    from privtune_flwr.attacks.inversion import blind_token_set
    from privtune_flwr.attacks.metrics import token_set_f1

    def tokens_only(texts) -> Released:  # a blind guess needs the answer key, not the bottom's output
        enc = split.tokenize(list(texts), settings.length_for(name))
        return Released(torch.zeros(*enc["input_ids"].shape, 1), enc["attention_mask"], enc["input_ids"])

    settings.validate()
    seed = settings.seeds[0]
    splits: dict = {}
    out = []
    for name in settings.datasets:
        ds = data.load_dataset(name, seed=seed, max_examples=settings.max_examples or None)
        if ds.task == data.GENERATION:  # the releases a generation point attacks: SmolLM2's, of prompt + continuation
            ds = data.TextDataset(ds.name, ds.task, _joined(name, ds.train), _joined(name, ds.test), ds.label_names,
                                  ds.attributes)
            key = (settings.generation_model, settings.generation_split_layer)
            if key not in splits:
                splits[key] = load_split(*key, "generation", protocol="u-shaped", seed=seed)
        else:
            key = (settings.model, 1)  # tokenisation only: any split of the classification model
            if key not in splits:
                splits[key] = load_split(*key, "classification", 2, seed=seed)
        split = splits[key]
        victim = _sample(ds.test, settings.max_victim, seed)
        inputs = attack_inputs(name, ds, victim, settings, seed)
        aux, vic = tokens_only(inputs["aux_texts"]), tokens_only(victim["text"])
        aux_tokens = aux.input_ids[real_token_mask(aux, split.special_ids)]
        keep = real_token_mask(vic, split.special_ids)
        truth = [vic.input_ids[i][keep[i]].tolist() for i in range(len(vic))]
        guess = blind_token_set(aux, split.special_ids)
        top = int(torch.bincount(aux_tokens).argmax())
        out.append({"dataset": name, "aux": inputs["aux_name"], "blind_accuracy": float((vic.input_ids[keep] == top).float().mean()),
                    "blind_token": split.tokenizer.convert_ids_to_tokens(top), "blind_f1": token_set_f1([guess] * len(truth), truth),
                    "blind_set_size": len(guess)})
    return out


def summary_table(summary: list[dict], dataset: str | None = None) -> str:
    """A markdown table: one line per (dataset, defence, ε) with utility (mean ± sd over seeds), the
    relative drop against ``none``, the steps used and, per attack, ``adaptive / static`` ASR; the
    last column lists the adaptive targets met (see :func:`meets_target`)."""
    rows = [r for r in summary if dataset is None or r["dataset"] == dataset]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    head = ["dataset", "defence", "ε", "seeds", "utility", "drop", "steps"] + attacks + ["adaptive targets met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in dict.fromkeys((r["dataset"], r["defense"], r["epsilon"]) for r in rows):
        mine = {(r["attack"], r["protocol"]): r for r in rows if (r["dataset"], r["defense"], r["epsilon"]) == key}
        r0 = next(iter(mine.values()))
        util = f"{r0['utility']:.3f}" + (f" ± {r0['utility_sd']:.3f}" if r0["seeds"] > 1 else "")
        if r0.get("perplexity") is not None:
            util += f" (ppl {r0['perplexity']:.1f})"
        drop = "-" if r0["drop"] is None else f"{100 * r0['drop']:+.1f}%"
        cells = []
        for a in attacks:
            got = [f"{mine[(a, p)]['asr']:.3f}" if (a, p) in mine else "-" for p in PROTOCOLS]
            cells.append(" / ".join(got))
        met = meets_target(summary, *key)
        ok = [k for k, v in met.items() if v]
        verdict = "all" if met and all(met.values()) else (", ".join(ok) or "none")
        eps = "-" if key[2] is None else f"{key[2]:g}"
        lines.append("| " + " | ".join([key[0], key[1], eps, str(r0["seeds"]), util, drop, f"{r0['steps']:.0f}"]
                                       + cells + [verdict]) + " |")
    return "\n".join(lines)


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(value))
    except ValueError:
        raise ValueError(f"seeds={value!r} is invalid; accepted: comma-separated integers >= 0") from None


def log_validation_scores() -> None:
    """Long points report each validation score (step, score, best so far) to stderr as they train."""
    cloud_log = logging.getLogger("privtune_flwr.cloud")
    if not cloud_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        cloud_log.addHandler(handler)
    cloud_log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="privacy-utility sweep: ASR against utility at convergence, per defence, ε and seed")
    parser.add_argument("--quick", action="store_true", help="small grid and sizes, a few minutes")
    parser.add_argument("--headline", action="store_true", help="the README's Rotten Tomatoes frontier (hours on 1 CPU core)")
    parser.add_argument("--all-datasets", action="store_true",
                        help="the headline defences at the headline epsilon on the other datasets, headline sizes")
    parser.add_argument("--generation", action="store_true",
                        help="generation points (BBC headlines; --datasets for the continuation tasks): "
                             "none, dchi, privtune at the headline epsilon")
    parser.add_argument("--floors", action="store_true",
                        help="only print (and write floors.json) the blind floors of EIA-2/EIA-3 at the headline sizes "
                             "(with --generation: the generation datasets at the generation sizes)")
    parser.add_argument("--rescore-attacks", action="store_true",
                        help="with --headline/--all-datasets/--generation: re-run only the attacks of the stored "
                             "points (after a change to the attacks), keeping their measured utility")
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets")
    parser.add_argument("--defenses")
    parser.add_argument("--epsilons")
    parser.add_argument("--attacks")
    parser.add_argument("--protocols", help=f"comma-separated attacker protocols (default: {','.join(PROTOCOLS)})")
    parser.add_argument("--seeds", help="comma-separated seeds of the split, samples, fine-tune, noise and attackers "
                                        "(default 0; fixed grids use their own unless given)")
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--max-steps", type=int, help="cap on optimiser steps per point")
    parser.add_argument("--patience", type=int, help="validation scores without a new best before stopping")
    parser.add_argument("--eval-every", type=int, help="optimiser steps between validation scores")
    parser.add_argument("--decays", type=int, help="learning-rate decays (x0.3) at a plateau before stopping")
    parser.add_argument("--model", help="classification: the model to split, an offline name or a local folder "
                                        "(e.g. a RoBERTa saved with save_pretrained; default minilm)")
    parser.add_argument("--split-layer", type=int, help="classification: split the model after this block (default 1)")
    parser.add_argument("--subspace-rank", type=int, help="label-subspace / label-obfuscator: directions (features) kept per token (default 1)")
    parser.add_argument("--subspace-fit", choices=SUBSPACE_FITS,
                        help="label-subspace: fit its directions with a small reader (default) or in closed form")
    parser.add_argument("--lora-targets", choices=LORA_TARGET_CHOICES,
                        help="LoRA on the top's attention query/value (default) or on all its linear layers, "
                             "with the pooler trained whole")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log_validation_scores()
    over: dict = {}
    for key in ("datasets", "defenses", "attacks", "protocols"):
        if getattr(args, key) is not None:
            over[key] = _names(getattr(args, key))
    if args.epsilons is not None:
        try:
            over["epsilons"] = tuple(float(e) for e in _names(args.epsilons))
        except ValueError:
            raise ValueError(f"epsilons={args.epsilons!r} is invalid; accepted: comma-separated numbers > 0") from None
    if args.seeds is not None:
        over["seeds"] = _ints(args.seeds)
    for key in ("model", "max_examples", "max_steps", "patience", "eval_every", "decays", "split_layer", "subspace_rank",
                "subspace_fit", "lora_targets"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    t0 = time.perf_counter()
    if args.floors:
        # --generation: the generation datasets at the generation sizes, tokenised as SmolLM2 releases them
        sizes, default = (GENERATION_COMMON, GENERATION_DATASETS) if args.generation else (HEADLINE_COMMON, FULL_DATASETS)
        floors = blind_floors(full_settings(**{**sizes, "datasets": over.get("datasets", default),
                                               "seeds": over.get("seeds", (0,)), "model": over.get("model", "minilm")}))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(args.out) / "floors.json", json.dumps(floors, indent=1))
        for f in floors:
            print(f"{f['dataset']:<18} aux {f['aux']:<18} blind top-1 {f['blind_accuracy']:.3f} ({f['blind_token']!r})  "
                  f"blind token-set F1 {f['blind_f1']:.3f} ({f['blind_set_size']} tokens)")
        return 0
    if args.generation:
        if "attacks" in over:
            raise ValueError("--attacks cannot be combined with --generation (its grid runs all six)")
        datasets = over.pop("datasets", ("bbc_headlines",))
        bad = [d for d in datasets if d not in GENERATION_DATASETS]
        if bad:
            raise ValueError(f"datasets={bad!r} are not generation tasks; accepted: {', '.join(GENERATION_DATASETS)}")
        grid = GENERATION_GRID
        if any(k in over for k in ("defenses", "epsilons", "seeds")):
            grid = ((over.pop("defenses", grid[0][0]), over.pop("epsilons", (HEADLINE_EPSILON,)), over.pop("seeds", (0,))),)
        rows = headline(Path(args.out), grid=grid, datasets=datasets, rescore=args.rescore_attacks,
                        **{**GENERATION_COMMON, **over})
        print(summary_table(summarise(rows)))
        print(f"{time.perf_counter() - t0:.1f} s; written {Path(args.out) / 'results.json'}")
        return 0
    if args.headline or args.all_datasets:
        # --datasets / --max-* / --patience / --eval-every / --protocols apply. --defenses, --epsilons
        # and --seeds replace the grid by one sub-grid at the same sizes (so a later full run reuses
        # its points); --attacks would change the sizes' meaning and is refused.
        if "attacks" in over:
            raise ValueError("--attacks cannot be combined with --headline/--all-datasets (their grid runs all six)")
        datasets = over.pop("datasets", ("rotten_tomatoes",) if args.headline else FULL_DATASETS[1:])
        grid = HEADLINE_GRID if args.headline else DATASETS_GRID
        if any(k in over for k in ("defenses", "epsilons", "seeds")):
            grid = ((over.pop("defenses", grid[0][0]), over.pop("epsilons", (HEADLINE_EPSILON,)),
                     over.pop("seeds", (0,))),)
        rows = headline(Path(args.out), grid=grid, datasets=datasets, rescore=args.rescore_attacks, **over)
        print(summary_table(summarise(rows)))
        print(f"{time.perf_counter() - t0:.1f} s; written {Path(args.out) / 'results.json'}")
        return 0
    settings = quick_settings(**over) if args.quick else full_settings(**over)
    result = sweep(settings, Path(args.out), rescore=args.rescore_attacks)
    print(summary_table(summarise(result["rows"])))
    print(f"{len(result['computed'])} point(s) computed, {len(result['skipped'])} skipped, "
          f"{time.perf_counter() - t0:.1f} s; written {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
