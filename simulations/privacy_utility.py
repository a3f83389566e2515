"""Privacy-utility sweep: utility of the fine-tuned top against attack success, per defence and ε.

``python -m simulations.privacy_utility [--quick | --headline | --all-datasets | --floors] --out DIR
[--datasets a,b] [--defenses ...] [--epsilons ...] [--attacks ...] [--max-examples N] [--steps N]``

For every (dataset, defence, ε) point it

1. fine-tunes the cloud top with the same :class:`DeviceSide`/:class:`CloudSide` code path as the
   Flower app and ``simulations.centralised`` (one in-process device holds the training subset;
   ``steps`` optimiser steps of ``batch_size`` sequences; the top is reset to its initial weights
   before every point);
2. scores utility on the victim test split released through the defence (``utility_metric`` is
   accuracy for balanced sets, macro-F1 for the unbalanced drug_reviews / political_debates);
3. runs the spec §4 attacks (:func:`privtune_flwr.attacks.run_attacks`): adaptive attacker, aux
   data released through the same bottom and defence, scored on the victim test release, each
   also against the clean release (``asr_clean``).

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
=================== ================== ========================================================

When the auxiliary corpus lacks the attribute, AIA-1 alone is trained on the victim dataset's
own train split (never its test split); the row's ``attack_aux`` says which aux each attack used.

Grids: quick = rotten_tomatoes + political_debates, none/dchi/gaussian/privtune, ε ∈ {16, 32, 64}
(MiniLM layer-1 token norms are ~11 with d = 384; d_chi noise norm is d/ε: 24, 12, 6), small data
and cheap attack settings (8 min measured on an idle 2-core machine, 60 steps). Full (default) = every classification corpus,
ε ∈ {8, 16, 24, 32, 48, 64, 128}, all six attacks at spec sizes, larger caps: hours on CPU.

Resumable: each finished point is written atomically to ``DIR/points/<dataset>__<defense>__<eps>.json``
(with a fingerprint of its settings; a rerun with the same settings skips it); ``results.json``,
``results.csv`` and ``<dataset>.png`` are rebuilt from the point files at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from privtune_flwr import data
from privtune_flwr.attacks import ATTACKS, run_attacks
from privtune_flwr.attacks.keywords import GENERIC_KEYWORDS, MOVIE_GENRE_KEYWORDS, genre_attribute, top_classes
from privtune_flwr.config import RunConfig
from privtune_flwr.defenses import DEFENSES
from privtune_flwr.models import load_split
from privtune_flwr.cloud import CloudSide, fine_tune
from privtune_flwr.device import DeviceSide, device_defense

# victim -> auxiliary corpus for the attacks (always a different dataset).
AUX_PAIRS: dict[str, str] = {
    "rotten_tomatoes": "imdb",
    "imdb": "rotten_tomatoes",
    "bbc_news": "political_speeches",
    "drug_reviews": "imdb",
    "political_debates": "political_speeches",
    "political_speeches": "political_debates",
}
SWEEP_DATASETS = tuple(AUX_PAIRS)
UNBALANCED = ("drug_reviews", "political_debates")  # utility = macro-F1
SWEEP_DEFENSES = tuple(DEFENSES)

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


@dataclass
class SweepSettings:
    datasets: tuple[str, ...] = QUICK_DATASETS
    defenses: tuple[str, ...] = QUICK_DEFENSES
    epsilons: tuple[float, ...] = QUICK_EPSILONS
    attacks: tuple[str, ...] = QUICK_ATTACKS
    attack_options: dict = field(default_factory=lambda: dict(QUICK_ATTACK_OPTIONS))
    steps: int = 60
    batch_size: int = 16
    max_examples: int = 2000  # per split of the victim corpus (0 = all)
    max_victim: int = 150  # victim test sequences scored for utility and attacked
    max_aux: int = 300  # auxiliary sequences the attacker trains on
    max_length: int = 64
    learning_rate: float = 3e-3
    seed: int = 0

    def validate(self) -> None:
        _check_names("dataset", self.datasets, SWEEP_DATASETS)
        _check_names("defense", self.defenses, SWEEP_DEFENSES)
        _check_names("attack", self.attacks, ATTACKS)
        bad = sorted(set(self.attack_options) - set(ATTACKS))
        if bad:
            raise ValueError(f"attack options for unknown attacks {bad}; accepted: {', '.join(ATTACKS)}")
        if any(d != "none" for d in self.defenses) and not self.epsilons:
            raise ValueError(f"epsilons={list(self.epsilons)!r} is empty; accepted: one or more finite values > 0")
        for eps in self.epsilons:
            if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
                raise ValueError(f"epsilon={eps!r} is invalid; accepted: a finite value > 0")
        for key in ("steps", "batch_size", "max_victim", "max_aux", "max_length"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid; accepted: an integer >= 1")
        if not isinstance(self.max_examples, int) or self.max_examples < 0:
            raise ValueError(f"max_examples={self.max_examples!r} is invalid; accepted: an integer >= 0 (0 = all)")

    def fingerprint(self, dataset: str) -> str:
        """Settings that change a point's rows (datasets/defences/ε lists do not)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("datasets", "defenses", "epsilons")}
        keep["dataset"] = dataset
        keep["aux"] = AUX_PAIRS[dataset]
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def quick_settings(**overrides) -> SweepSettings:
    return SweepSettings(**overrides)


def full_settings(**overrides) -> SweepSettings:
    base = dict(datasets=FULL_DATASETS, defenses=FULL_DEFENSES, epsilons=FULL_EPSILONS, attacks=FULL_ATTACKS,
                attack_options={}, steps=200, max_examples=0, max_victim=1000, max_aux=2000, learning_rate=1e-3)
    base.update(overrides)
    return SweepSettings(**base)


# The README's headline table: Rotten Tomatoes, every defence at eps 64 (the app's default), the
# three main defences also at 32 and 128, all six attacks; about 35 minutes on 2 cores.
HEADLINE_COMMON = dict(
    datasets=("rotten_tomatoes",), max_victim=500, max_aux=1000, steps=200, learning_rate=1e-3, max_examples=0,
    attack_options={"eia-mlp": {"hidden": 1024, "epochs": 3, "vocab_cap": 4000}, "eia-context": {"width": 128, "epochs": 4},
                    "aia-attribute": {"epochs": 30}, "aia-keyword": {"epochs": 30}, "aia-bow": {"epochs": 30}},
)
HEADLINE_GRID = (
    (("none", "dchi", "gaussian", "privtune", "privtune-sampled-target"), (64.0,)),
    (("privtune-noimp", "privtune-nomean", "privtune-random-target"), (64.0,)),
    (("dchi", "gaussian", "privtune"), (32.0, 128.0)),
)


# Every dataset of the paper at the headline sizes: none, dchi, gaussian and privtune at eps 64.
# Same settings as the headline, so its Rotten Tomatoes points are reused when ``out`` is shared.
DATASETS_GRID = ((("none", "dchi", "gaussian", "privtune"), (64.0,)),)


def headline(out: Path, *, progress: bool = True, grid=HEADLINE_GRID, datasets=("rotten_tomatoes",), **overrides) -> list[dict]:
    """Run (or resume) ``grid`` (pairs of defences and epsilons) on ``datasets`` at the headline
    sizes (``overrides``: other settings, e.g. ``steps``) into ``out``; the results cover every
    point of the grid."""
    rows: list[dict] = []
    common = {**HEADLINE_COMMON, **overrides, "datasets": tuple(datasets)}
    for defenses, epsilons in grid:
        rows += sweep(full_settings(defenses=defenses, epsilons=epsilons, **common), out, plots=False, progress=progress)["rows"]
    seen, unique = set(), []
    for r in rows:  # `none` appears once per sub-grid that lists it
        key = (r["dataset"], r["defense"], r["epsilon"], r["attack"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    write_results(unique, Path(out))
    plot(unique, Path(out))
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


def attack_inputs(name: str, ds: data.TextDataset, victim, settings: SweepSettings) -> dict:
    """Aux texts, attributes and keywords for the attacks on victim ``name``.

    Returns ``{"aux_name", "aux_texts", "attribute", "aux_attr", "victim_attr", "keywords",
    "attr_aux_name", "attr_aux_texts"}``; ``attr_aux_*`` is set only when AIA-1 needs its own aux.
    """
    aux_name = AUX_PAIRS[name]
    aux_ds = data.load_dataset(aux_name, seed=settings.seed, max_examples=max(settings.max_aux, 1))
    aux = _sample(aux_ds.train, settings.max_aux, settings.seed + 1)
    out = {"aux_name": aux_name, "aux_texts": list(aux["text"]), "attr_aux_name": None, "attr_aux_texts": None}
    vtexts = list(victim["text"])
    if name in ("rotten_tomatoes", "imdb"):
        out["keywords"] = list(MOVIE_GENRE_KEYWORDS)
        a, _ = genre_attribute(out["aux_texts"])
        v, _ = genre_attribute(vtexts)
        if int((v >= 0).sum()) >= 10 and a[a >= 0].unique().numel() >= 2:
            out.update(attribute="genre", aux_attr=a, victim_attr=v)
        else:  # short sentences rarely name a genre: fall back to the sentiment label
            out.update(attribute="sentiment", aux_attr=torch.tensor(list(aux["label"])),
                       victim_attr=torch.tensor(list(victim["label"])))
    elif name in ("political_debates", "political_speeches"):
        out["keywords"] = list(GENERIC_KEYWORDS)
        a, _ = top_classes([_party(p) for p in aux["party"]], 2, classes=PARTY_CLASSES)
        v, _ = top_classes([_party(p) for p in victim["party"]], 2, classes=PARTY_CLASSES)
        out.update(attribute="party", aux_attr=a, victim_attr=v)
    else:  # bbc_news: topic; drug_reviews: condition: only the victim corpus carries them
        column = "topic" if name == "bbc_news" else "condition"
        out["keywords"] = list(GENERIC_KEYWORDS)
        own = _sample(ds.train, settings.max_aux, settings.seed + 2)
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


def classification_utility(name: str, split, defense, ds, victim, settings: SweepSettings) -> dict:
    """Fine-tune the classifier top on releases of ``ds.train``; score it on the victim release."""
    device = DeviceSide(split, defense, max_length=settings.max_length, audit_tokens=0)
    cloud = CloudSide(split, learning_rate=settings.learning_rate, batch_size=settings.batch_size, seed=settings.seed)
    losses = fine_tune(device, cloud, ds.train, settings.steps, seed=settings.seed)
    rel = device.release(victim["text"], victim["label"])
    scores = cloud.evaluate(rel.hidden, rel.attention_mask, rel.labels)
    metric = "macro-f1" if name in UNBALANCED else "accuracy"
    return {"utility_metric": metric, "utility": float(scores[metric]), "accuracy": float(scores["accuracy"]),
            "macro_f1": float(scores["macro-f1"]), "final_train_loss": sum(losses[-10:]) / len(losses[-10:])}


# Utility scorer per task: ``(name, split, defense, ds, victim, settings) -> {"utility_metric",
# "utility", ...}``. Generation slots in here (a causal-LM top scored by perplexity or ROUGE-L on
# the victim release) together with an AUX_PAIRS entry and a split loaded for the task (``sweep``
# loads a classification MiniLM today); the attacks only see token releases and are task-agnostic.
UTILITY = {"classification": classification_utility}


def run_point(name: str, defense_name: str, eps: float | None, split, initial_state, ds, victim, inputs,
              settings: SweepSettings, *, defense=None) -> list[dict]:
    """Fine-tune, score utility and attack one (dataset, defence, ε) point; returns its rows.

    ``defense``: a ready-made defence module to use instead of building ``defense_name`` (for
    experimental variants outside the registry); rows still carry ``defense_name``.
    """
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    split.load_trainable_state(initial_state)  # every point starts from the same top
    if defense is None:
        options = RunConfig(defense=defense_name, seed=settings.seed, max_length=settings.max_length).defense_options()
        # Seeded noise (stated in every row): a sweep must be reproducible; a device's is secret.
        defense = device_defense(defense_name, split, epsilon=None if eps is None else float(eps),
                                 texts=ds.train["text"], labels=ds.train["label"], task=ds.task,
                                 max_length=settings.max_length, seed=settings.seed, **options)
    if ds.task not in UTILITY:
        raise ValueError(f"dataset={name!r} is a {ds.task} task; the sweep scores: {', '.join(UTILITY)}")
    utility = UTILITY[ds.task](name, split, defense, ds, victim, settings)
    t_train = time.perf_counter() - t0

    statement = defense.statement()
    privacy = {f"privacy_{k}": v for k, v in statement.to_dict().items()
               if k not in ("defense", "epsilon") and (v is None or isinstance(v, (int, float, str, bool)))}
    privacy["privacy_scales"] = ",".join(f"{s:g}" for s in statement.scales)

    attacks = list(settings.attacks)
    attr_separate = inputs["attr_aux_texts"] is not None and "aia-attribute" in attacks
    main_names = [a for a in attacks if not (attr_separate and a == "aia-attribute")]
    opts = settings.attack_options
    common = dict(keywords=inputs["keywords"], max_length=settings.max_length, seed=settings.seed)
    results: list[tuple[dict, str]] = []
    if main_names:
        # The attribute labels belong to the aux AIA-1 trains on: only passed when that is this aux.
        with_attr = "aia-attribute" in main_names
        res = run_attacks(split, defense, inputs["aux_texts"], list(victim["text"]),
                          aux_attributes={inputs["attribute"]: inputs["aux_attr"]} if with_attr else None,
                          victim_attributes={inputs["attribute"]: inputs["victim_attr"]} if with_attr else None,
                          attribute=inputs["attribute"] if with_attr else None, names=main_names,
                          options={k: v for k, v in opts.items() if k in main_names}, **common)
        results += [(r, inputs["aux_name"]) for r in res]
    if attr_separate:
        res = run_attacks(split, defense, inputs["attr_aux_texts"], list(victim["text"]),
                          aux_attributes={inputs["attribute"]: inputs["aux_attr"]},
                          victim_attributes={inputs["attribute"]: inputs["victim_attr"]},
                          attribute=inputs["attribute"], names=["aia-attribute"],
                          options={k: v for k, v in opts.items() if k == "aia-attribute"}, **common)
        results += [(r, inputs["attr_aux_name"]) for r in res]
    seconds = time.perf_counter() - t0
    base = {
        "dataset": name, "defense": defense_name, "epsilon": None if defense_name == "none" else float(eps),
        **utility, "victim_examples": len(victim), "steps": settings.steps, "train_seconds": t_train,
        "point_seconds": seconds, "attribute": inputs["attribute"],
    }
    rows = []
    order_index = {a: i for i, a in enumerate(attacks)}
    for r, aux_used in sorted(results, key=lambda x: order_index[x[0]["attack"]]):
        extras = {f"attack_{k}": v for k, v in r.items()
                  if k not in ("attack", "asr", "asr_clean", "defense", "epsilon", "seconds", "clean")
                  and (v is None or isinstance(v, (int, float, str, bool)))}
        rows.append({**base, "attack": r["attack"], "asr": float(r["asr"]), "asr_clean": float(r["asr_clean"]),
                     "attack_aux": aux_used, "attack_seconds": float(r["seconds"]), **extras, **privacy})
    return rows


# ------------------------------------------------------------------------------------------------
# Sweep, storage, outputs
# ------------------------------------------------------------------------------------------------


def point_path(out: Path, dataset: str, defense: str, eps: float | None) -> Path:
    tag = "none" if eps is None else f"{eps:g}"
    return out / "points" / f"{dataset}__{defense}__{tag}.json"


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


def points_of(settings: SweepSettings) -> list[tuple[str, str, float | None]]:
    pts = []
    for name in settings.datasets:
        for d in settings.defenses:
            if d == "none":
                pts.append((name, d, None))
            else:
                pts += [(name, d, float(e)) for e in settings.epsilons]
    return pts


def sweep(settings: SweepSettings, out: Path, *, plots: bool = True, progress: bool = True) -> dict:
    """Run every missing point, then rebuild results.json/csv and plots. Returns rows and counts."""
    settings.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pts = points_of(settings)
    computed, skipped = [], []
    all_rows: list[dict] = []
    bar = tqdm(total=len(pts), desc="privacy-utility points", unit="point", disable=not progress)
    for name in settings.datasets:
        fp = settings.fingerprint(name)
        mine = [p for p in pts if p[0] == name]
        todo = []
        for p in mine:
            rows = _load_point(point_path(out, *p), fp)
            if rows is None:
                todo.append(p)
            else:
                skipped.append(p)
                all_rows += rows
                bar.update(1)
        if not todo:
            continue
        ds = data.load_dataset(name, seed=settings.seed, max_examples=settings.max_examples or None)
        if len(ds.train) == 0 or len(ds.test) == 0:
            raise ValueError(f"dataset={name!r} has an empty split (train {len(ds.train)}, test {len(ds.test)})")
        victim = _sample(ds.test, settings.max_victim, settings.seed)
        inputs = attack_inputs(name, ds, victim, settings)
        split = load_split("minilm", 1, "classification", ds.num_labels, seed=settings.seed)
        initial = split.trainable_state()
        for p in todo:
            bar.set_postfix_str(f"{p[0]} {p[1]} eps={p[2]}")
            rows = run_point(p[0], p[1], p[2], split, initial, ds, victim, inputs, settings)
            _atomic_write(point_path(out, *p), json.dumps({"fingerprint": fp, "point": list(p), "rows": rows}, indent=1))
            computed.append(p)
            all_rows += rows
            bar.update(1)
    bar.close()
    key = {p: i for i, p in enumerate(pts)}
    all_rows.sort(key=lambda r: key.get((r["dataset"], r["defense"], r["epsilon"]), len(key)))
    write_results(all_rows, out)
    if plots:
        plot(all_rows, out)
    return {"rows": all_rows, "computed": computed, "skipped": skipped}


def write_results(rows: list[dict], out: Path) -> None:
    _atomic_write(out / "results.json", json.dumps(rows, indent=1))
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    fd, tmp = tempfile.mkstemp(dir=out, prefix="results.csv", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "results.csv")


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        attacks = list(dict.fromkeys(r["attack"] for r in mine))
        fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.6), squeeze=False)
        for ax, attack in zip(axes[0], attacks):
            sel = [r for r in mine if r["attack"] == attack]
            for d in dict.fromkeys(r["defense"] for r in sel):
                pts = sorted((r for r in sel if r["defense"] == d), key=lambda r: r["epsilon"] or 0)
                if d == "none":
                    ax.scatter([p["utility"] for p in pts], [p["asr"] for p in pts], marker="*", s=150, c="k",
                               label="none", zorder=3)
                    continue
                ax.plot([p["utility"] for p in pts], [p["asr"] for p in pts], marker="o", label=d)
                for p in pts:
                    ax.annotate(f"{p['epsilon']:g}", (p["utility"], p["asr"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
            ax.set_title(f"{attack} ({sel[0].get('attack_metric', 'asr')})", fontsize=9)
            ax.set_xlabel(f"utility ({sel[0]['utility_metric']})")
            ax.set_ylabel("ASR")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{name}: attack success vs utility (labels: ε)")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
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
        enc = split.tokenize(list(texts), settings.max_length)
        return Released(torch.zeros(*enc["input_ids"].shape, 1), enc["attention_mask"], enc["input_ids"])

    settings.validate()
    split = load_split("minilm", 1, "classification", 2, seed=settings.seed)
    out = []
    for name in settings.datasets:
        ds = data.load_dataset(name, seed=settings.seed, max_examples=settings.max_examples or None)
        victim = _sample(ds.test, settings.max_victim, settings.seed)
        inputs = attack_inputs(name, ds, victim, settings)
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


def _table(rows: list[dict]) -> str:
    lines = [f"{'dataset':<18} {'defense':<9} {'eps':>5} {'utility':>13} {'attack':<14} {'asr':>6} {'clean':>6}"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
        util = f"{r['utility']:.3f} {r['utility_metric'][:5]}"
        lines.append(f"{r['dataset']:<18} {r['defense']:<9} {eps:>5} {util:>13} {r['attack']:<14} "
                     f"{r['asr']:>6.3f} {r['asr_clean']:>6.3f}")
    return "\n".join(lines)


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="privacy-utility sweep: ASR against utility per defence and ε")
    parser.add_argument("--quick", action="store_true", help="small grid and sizes (8 min measured on an idle 2-core machine)")
    parser.add_argument("--headline", action="store_true", help="the README's Rotten Tomatoes table (~35 min on 2 CPU cores)")
    parser.add_argument("--all-datasets", action="store_true",
                        help="none/dchi/gaussian/privtune at eps 64 on the five datasets, headline sizes (~15 min per dataset on 1 core)")
    parser.add_argument("--floors", action="store_true",
                        help="only print (and write floors.json) the blind floors of EIA-2/EIA-3 at the headline sizes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets")
    parser.add_argument("--defenses")
    parser.add_argument("--epsilons")
    parser.add_argument("--attacks")
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, help="seed of the samples, the fine-tune, the noise and the attackers (default 0)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    over: dict = {}
    if args.datasets is not None:
        over["datasets"] = _names(args.datasets)
    if args.defenses is not None:
        over["defenses"] = _names(args.defenses)
    if args.attacks is not None:
        over["attacks"] = _names(args.attacks)
    if args.epsilons is not None:
        try:
            over["epsilons"] = tuple(float(e) for e in _names(args.epsilons))
        except ValueError:
            raise ValueError(f"epsilons={args.epsilons!r} is invalid; accepted: comma-separated numbers > 0") from None
    if args.max_examples is not None:
        over["max_examples"] = args.max_examples
    if args.steps is not None:
        over["steps"] = args.steps
    if args.seed is not None:
        over["seed"] = args.seed
    t0 = time.perf_counter()
    if args.floors:
        floors = blind_floors(full_settings(**{**HEADLINE_COMMON, "datasets": over.get("datasets", FULL_DATASETS)}))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(args.out) / "floors.json", json.dumps(floors, indent=1))
        for f in floors:
            print(f"{f['dataset']:<18} aux {f['aux']:<18} blind top-1 {f['blind_accuracy']:.3f} ({f['blind_token']!r})  "
                  f"blind token-set F1 {f['blind_f1']:.3f} ({f['blind_set_size']} tokens)")
        return 0
    if args.headline or args.all_datasets:
        # --datasets / --steps / --max-examples / --seed apply; the grid fixes defences, epsilons, attacks
        ignored = [k for k in ("defenses", "epsilons", "attacks") if k in over]
        if ignored:
            raise ValueError(f"--{ignored[0]} cannot be combined with --headline/--all-datasets (their grid fixes it)")
        datasets = over.pop("datasets", ("rotten_tomatoes",) if args.headline else FULL_DATASETS)
        grid = HEADLINE_GRID if args.headline else DATASETS_GRID
        rows = headline(Path(args.out), grid=grid, datasets=datasets, **over)
        print(_table(rows))
        print(f"{time.perf_counter() - t0:.1f} s; written {Path(args.out) / 'results.json'}")
        return 0
    settings = quick_settings(**over) if args.quick else full_settings(**over)
    result = sweep(settings, Path(args.out))
    print(_table(result["rows"]))
    print(f"{len(result['computed'])} point(s) computed, {len(result['skipped'])} skipped, "
          f"{time.perf_counter() - t0:.1f} s; written {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
