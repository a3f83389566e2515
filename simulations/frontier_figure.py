"""One frontier figure from several sweep output folders (for example split 1 and split 3).

    python -m simulations.frontier_figure --out DIR SOURCE [SOURCE ...]

A SOURCE is a sweep's ``--out`` folder, optionally followed by ``=LABEL``. It may also be the
``results.csv`` of an earlier figure: then it gives the rows that figure drew under the same LABEL
(or with none), so new points can join committed ones whose folders are gone. The stored points
(``points/*.json``) of the sources that share a label are pooled (so seeds run into separate
folders average together) and summarised on their own: a defence's drop is measured against
``none`` of the same label, never against another split's. A labelled source's defences are then
named ``"<defence> (<label>)"``; the plots draw ``none (<label>)`` as a grey reference star.

Writes ``results.csv``/``summary.csv`` and one PNG per dataset and protocol into
``DIR``, and prints the summary table. Nothing is trained or attacked: it reads stored rows only.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from simulations.privacy_utility import _write_table, plot, summarise, summary_table

# a stored row is one (dataset, defence, ε, seed, attack, protocol); the same row in two sources is one row
ROW_KEY = ("dataset", "defense", "epsilon", "seed", "attack", "protocol")
# ... but only if it was measured the same way: rows that share a key and differ in these are refused
SAME_POINT = ("split_layer", "lora_targets", "privacy_projection_rank", "privacy_learned_rank", "utility", "asr")


def _cell(text: str):
    """A CSV cell back as the scalar the sweep stored: '' -> None, bools, ints, floats, else the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_figure_rows(path: Path, label: str) -> list[dict]:
    """The rows an earlier figure's ``results.csv`` drew under ``label``, with the label taken off
    their defence names (so they pool with fresh points of that label); a clear error if none."""
    suffix = f" ({label})" if label else ""
    with path.open(newline="") as f:
        table = list(csv.DictReader(f))
    rows = []
    for record in table:
        name = record.get("defense") or ""
        if label and name.endswith(suffix):
            base = name[: -len(suffix)]
        elif not label and not name.endswith(")"):
            base = name
        else:
            continue
        rows.append({**{k: _cell(v) for k, v in record.items()}, "defense": base})
    if not rows:
        raise ValueError(f"{str(path)!r} has no row drawn under the label {label!r}")
    return rows


def read_points(folder: Path, label: str = "") -> list[dict]:
    """Every row stored under ``folder/points`` (or, for an earlier figure's ``results.csv``, its
    rows under ``label``); a clear error if there is none."""
    if folder.suffix == ".csv":
        if not folder.is_file():
            raise ValueError(f"source {str(folder)!r} is not a file")
        return read_figure_rows(folder, label)
    files = sorted((folder / "points").glob("*.json"))
    if not files:
        raise ValueError(f"source {str(folder)!r} has no stored points (expected {folder / 'points'}/*.json)")
    rows = []
    for path in files:
        try:
            record = json.loads(path.read_text())
            rows += record["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a sweep point ({exc.__class__.__name__}: {exc})") from None
    return rows


def parse_source(text: str) -> tuple[Path, str]:
    folder, _, label = text.partition("=")
    if not folder:
        raise ValueError(f"source {text!r} is invalid; accepted: DIR or DIR=LABEL")
    return Path(folder), label.strip()


def combine(sources: list[tuple[Path, str]]) -> tuple[list[dict], list[dict]]:
    """(rows, summary) of ``sources``, pooled and summarised per label, then renamed by label."""
    groups: dict[str, dict[tuple, dict]] = {}
    origin: dict[tuple, str] = {}  # (label, row key) -> the folder the kept row came from
    for folder, label in sources:
        pooled = groups.setdefault(label, {})
        for row in read_points(folder, label):
            key = tuple(row.get(k) for k in ROW_KEY)
            seen = pooled.setdefault(key, row)
            origin.setdefault((label, key), str(folder))
            if any(seen.get(k) != row.get(k) for k in SAME_POINT):
                raise ValueError(
                    f"{dict(zip(ROW_KEY, key))} is stored differently in {origin[label, key]!r} and {str(folder)!r} "
                    f"(split, LoRA targets, subspace rank or scores differ); give the two folders different labels")

    def named(record: dict, label: str) -> dict:
        return {**record, "defense": f"{record['defense']} ({label})"} if label else record

    # `none` rows by (dataset, seed, split layer), per label: a label with no `none` of its own for a
    # dataset measures its drops there against another label's `none` at the same seed and split
    nones: dict[tuple, dict[str, list[dict]]] = {}
    for label, pooled in groups.items():
        for r in pooled.values():
            if r["defense"] == "none":
                nones.setdefault((r["dataset"], r["seed"], r.get("split_layer")), {}).setdefault(label, []).append(r)
    rows, summary = [], []
    for label, pooled in groups.items():
        mine = list(pooled.values())
        rows += [named(r, label) for r in mine]
        own = {r["dataset"] for r in mine if r["defense"] == "none"}
        borrowed, lenders = [], set()
        for point in sorted({(r["dataset"], r["seed"], r.get("split_layer")) for r in mine if r["dataset"] not in own},
                            key=str):
            others = sorted(k for k in nones.get(point, {}) if k != label)
            if others:
                borrowed += nones[point][others[0]]
                lenders.add(others[0] or "(no label)")
        if lenders:
            print(f"{label or '(no label)'}: drops measured against the `none` of {', '.join(sorted(lenders))} "
                  "(same dataset, seed and split), having none of its own there")
        kept = [s for s in summarise(mine + borrowed) if s["defense"] != "none" or s["dataset"] in own]
        summary += [named(s, label) for s in kept]
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one frontier figure from several sweep output folders")
    parser.add_argument("--out", required=True, help="folder for the figures and tables")
    parser.add_argument("sources", nargs="+", help="sweep --out folders, each optionally DIR=LABEL")
    args = parser.parse_args(argv)
    rows, summary = combine([parse_source(s) for s in args.sources])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_table(rows, out, "results", with_json=False)
    _write_table(summary, out, "summary", with_json=False)
    paths = plot(summary, out)
    print(summary_table(summary))
    print("written", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
