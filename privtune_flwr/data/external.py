"""User datasets: a local ``.csv``/``.json``/``.jsonl`` file or a Hugging Face dataset id, with its text
and label columns found and its labels encoded."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from .corpora import CLASSIFICATION, DATASETS, _Raw


# Column names probed, in order, when a user dataset does not follow our own schema.
TEXT_COLUMNS: tuple[str, ...] = ("text", "sentence", "review", "content")


LABEL_COLUMNS: tuple[str, ...] = ("label", "labels")


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
