"""The privacy-utility sweep on a tiny grid: outputs, resumption, the defence's effect, bad names."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simulations import privacy_utility as pu  # noqa: E402

REQUIRED = {"dataset", "defense", "epsilon", "seed", "utility_metric", "utility", "attack", "protocol", "asr",
            "asr_clean", "attack_aux", "point_seconds", "privacy_guarantee", "steps", "best_step", "stopped_by"}


def _tiny(**over) -> pu.SweepSettings:
    base = dict(datasets=("rotten_tomatoes",), defenses=("none", "dchi"), epsilons=(2.0,),
                attacks=("eia-knn", "aia-attribute"), attack_options={"aia-attribute": {"epochs": 5}},
                max_steps=4, eval_every=2, patience=1, batch_size=8, max_examples=200, max_victim=24, max_aux=48,
                max_length=32)
    base.update(over)
    return pu.SweepSettings(**base)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pu")
    first = pu.sweep(_tiny(), out, plots=True, progress=False)
    return out, first


def test_writes_results_with_required_keys(swept):
    out, first = swept
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 8  # 2 points x 2 attacks x 2 protocols
    for row in rows:
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert 0.0 <= row["asr"] <= 1.0 and 0.0 <= row["utility"] <= 1.0
        assert row["attack_aux"] == "imdb"  # a different corpus from the victim's
        assert 1 <= row["steps"] <= 4 and row["stopped_by"] in ("patience", "max-steps")
    assert {(r["defense"], r["epsilon"]) for r in rows} == {("none", None), ("dchi", 2.0)}
    assert {(r["attack"], r["protocol"]) for r in rows} == {(a, p) for a in ("eia-knn", "aia-attribute")
                                                            for p in ("adaptive", "static")}
    assert (out / "results.csv").read_text().startswith("dataset,")
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 8 and all(r["seeds"] == 1 for r in summary)
    assert {r["drop"] for r in summary if r["defense"] == "none"} == {0.0}
    for protocol in ("adaptive", "static"):
        assert (out / f"rotten_tomatoes_{protocol}.png").stat().st_size > 0
    assert len(first["computed"]) == 2 and not first["skipped"]


def test_rerun_skips_finished_points(swept):
    out, _ = swept
    points = sorted((out / "points").glob("*.json"))
    assert [p.name for p in points] == ["rotten_tomatoes__dchi__2__s0.json", "rotten_tomatoes__none__none__s0.json"]
    mtimes = [p.stat().st_mtime_ns for p in points]
    again = pu.sweep(_tiny(), out, plots=False, progress=False)
    assert not again["computed"] and len(again["skipped"]) == 2
    assert [p.stat().st_mtime_ns for p in points] == mtimes
    assert len(again["rows"]) == 8
    assert not list(out.rglob("*.tmp"))


def test_rescoring_reruns_the_attacks_and_keeps_the_stored_utility(swept, tmp_path):
    out, first = swept
    shutil.copytree(out / "points", tmp_path / "points")
    path = tmp_path / "points" / "rotten_tomatoes__dchi__2__s0.json"
    stored = json.loads(path.read_text())
    original = {(r["attack"], r["protocol"]): r["asr"] for r in stored["rows"]}
    for r in stored["rows"]:  # a stale point: its attack scores are wrong, its utility is marked
        r["asr"], r["utility"], r["train_seconds"] = 0.999, 0.123456, 5.0
    path.write_text(json.dumps(stored))
    none_before = (tmp_path / "points" / "rotten_tomatoes__none__none__s0.json").read_text()
    rows = pu.rescore_attacks(_tiny(defenses=("dchi",)), tmp_path, progress=False)["rows"]
    assert len(rows) == 4
    assert {(r["attack"], r["protocol"]): r["asr"] for r in rows} == pytest.approx(original, abs=1e-6)
    assert {r["utility"] for r in rows} == {0.123456}  # not fine-tuned again
    assert all(r["train_seconds"] == 5.0 and r["point_seconds"] >= 5.0 for r in rows)
    again = json.loads(path.read_text())
    assert again["fingerprint"] == stored["fingerprint"] and "attacks_rescored" in again
    assert [r["asr"] for r in again["rows"]] == [r["asr"] for r in rows]
    assert (tmp_path / "points" / "rotten_tomatoes__none__none__s0.json").read_text() == none_before
    # a point that was never computed (or was computed under other settings) is refused, not trained
    with pytest.raises(ValueError, match="no stored result"):
        pu.rescore_attacks(_tiny(defenses=("dchi",), epsilons=(4.0,)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no stored result"):
        pu.rescore_attacks(_tiny(defenses=("dchi",), max_steps=6), tmp_path, progress=False)


def test_dchi_at_small_epsilon_lowers_knn_inversion(swept):
    _, first = swept
    knn = {r["defense"]: r for r in first["rows"] if r["attack"] == "eia-knn" and r["protocol"] == "adaptive"}
    assert knn["dchi"]["asr"] <= knn["none"]["asr"]
    assert knn["dchi"]["asr_clean"] == pytest.approx(knn["none"]["asr"])
    assert knn["none"]["asr"] > 0.5  # clean layer-1 representations invert easily


@pytest.mark.parametrize("field,value,accepted", [
    ("datasets", ("nope",), "rotten_tomatoes"),
    ("defenses", ("nope",), "dchi"),
    ("attacks", ("nope",), "eia-knn"),
    ("datasets", (), "rotten_tomatoes"),
])
def test_bad_names_raise(field, value, accepted, tmp_path):
    with pytest.raises(ValueError, match=accepted) as info:
        pu.sweep(_tiny(**{field: value}), tmp_path, progress=False)
    if value:
        assert repr(value[0]) in str(info.value)
    assert not (tmp_path / "results.json").exists()


def test_cli_rejects_unknown_attack(tmp_path):
    with pytest.raises(ValueError, match="eia-knn"):
        pu.main(["--quick", "--out", str(tmp_path), "--attacks", "eia-knn,bogus"])


def test_headline_grid_over_several_datasets_keeps_every_row(tmp_path, monkeypatch):
    tiny = dict(max_victim=16, max_aux=32, max_steps=2, eval_every=1, patience=1, batch_size=8, max_examples=120,
                max_length=32, attacks=("eia-knn",), attack_options={}, protocols=("adaptive",))
    monkeypatch.setattr(pu, "HEADLINE_COMMON", tiny)
    grid = ((("none", "dchi"), (2.0,), (0,)), (("none",), (), (0,)))  # `none` listed twice: kept once per dataset
    rows = pu.headline(tmp_path, progress=False, grid=grid, datasets=("rotten_tomatoes", "political_debates"))
    keys = [(r["dataset"], r["defense"], r["epsilon"], r["attack"]) for r in rows]
    assert sorted(keys, key=str) == sorted([(d, "none", None, "eia-knn") for d in ("rotten_tomatoes", "political_debates")]
                                           + [(d, "dchi", 2.0, "eia-knn") for d in ("rotten_tomatoes", "political_debates")], key=str)
    assert {r["utility_metric"] for r in rows if r["dataset"] == "political_debates"} == {"macro-f1"}
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4
    assert (tmp_path / "political_debates_adaptive.png").exists()


def test_datasets_grid_names_the_five_datasets():
    assert pu.FULL_DATASETS == ("rotten_tomatoes", "imdb", "bbc_news", "drug_reviews", "political_debates")
    assert {"none", "dchi", "gaussian", "privtune"} <= {d for defenses, _, _ in pu.DATASETS_GRID for d in defenses}


def test_attribute_from_the_victims_own_train_split_when_the_aux_lacks_it(tmp_path):
    # drug_reviews: the attacks train on IMDB, but only the victim corpus has `condition`, so
    # AIA-1 alone trains on drug_reviews train rows (never the victim's test rows).
    # max_examples=40 leaves fewer drug_reviews train rows than the 48 IMDB aux texts.
    settings = _tiny(datasets=("drug_reviews",), defenses=("none",), attacks=("eia-knn", "aia-attribute"),
                     max_examples=40)
    rows = pu.sweep(settings, tmp_path, plots=False, progress=False)["rows"]
    aux = {r["attack"]: r["attack_aux"] for r in rows}
    assert aux == {"eia-knn": "imdb", "aia-attribute": "drug_reviews:train"}
    assert {r["attribute"] for r in rows} == {"condition"}
    assert all(r["utility_metric"] == "macro-f1" for r in rows)


def test_blind_floors_guess_frequent_tokens_without_any_release():
    floors = pu.blind_floors(_tiny(max_victim=40, max_aux=80))
    [f] = floors
    assert f["dataset"] == "rotten_tomatoes" and f["aux"] == "imdb"
    assert 0.0 < f["blind_accuracy"] < 0.2  # one token is never most of a review
    assert 0.1 < f["blind_f1"] < 0.6 and f["blind_set_size"] >= 1  # frequent words are in most sentences


def test_fixed_grids_refuse_grid_options(tmp_path):
    with pytest.raises(ValueError, match="--attacks cannot be combined"):
        pu.main(["--all-datasets", "--attacks", "eia-knn", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--attacks cannot be combined with --generation"):
        pu.main(["--generation", "--attacks", "eia-knn", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"\['rotten_tomatoes'\] are not generation tasks; accepted: bbc_headlines"):
        pu.main(["--generation", "--datasets", "rotten_tomatoes", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


def _row(defense, eps, seed, attack, utility, asr, protocol="adaptive", **extra):
    return {"dataset": "rotten_tomatoes", "defense": defense, "epsilon": eps, "seed": seed, "attack": attack,
            "protocol": protocol, "utility": utility, "utility_metric": "accuracy", "asr": asr, "asr_clean": 0.9,
            "steps": 100, "stopped_by": "patience", "point_seconds": 1.0, **extra}


def test_summary_means_over_seeds_with_the_drop_against_none_of_the_same_seed():
    rows = [_row("none", None, 0, "eia-knn", 0.80, 1.0), _row("none", None, 1, "eia-knn", 0.90, 1.0),
            _row("dchi", 8.0, 0, "eia-knn", 0.76, 0.2), _row("dchi", 8.0, 1, "eia-knn", 0.81, 0.4)]
    [none, dchi] = pu.summarise(rows)
    assert none["drop"] == 0.0 and none["seeds"] == 2 and none["utility"] == pytest.approx(0.85)
    assert dchi["drop"] == pytest.approx(0.075) and dchi["drop_sd"] == pytest.approx(0.0353553, rel=1e-5)
    assert dchi["asr"] == pytest.approx(0.3) and dchi["asr_sd"] == pytest.approx(0.1414214, rel=1e-5)


def test_target_check_reads_each_attack_against_its_floor():
    rows = [_row("none", None, 0, "eia-mlp", 0.80, 0.85, attack_blind_accuracy=0.04)]
    point = [("eia-knn", 0.05, {}), ("eia-mlp", 0.09, {"attack_blind_accuracy": 0.04}),
             ("eia-context", 0.30, {"attack_blind_f1": 0.265}), ("aia-attribute", 0.40, {"attack_majority_rate": 0.308}),
             ("aia-keyword", 0.54, {}), ("aia-bow", 0.04, {"attack_blind_recall": 0.0})]
    rows += [_row("x", 1.0, 0, a, 0.78, asr, **extra) for a, asr, extra in point]
    summary = pu.summarise(rows)
    met = pu.meets_target(summary, "rotten_tomatoes", "x", 1.0)
    assert met == {"drop": True, "eia-knn": True, "eia-mlp": True, "eia-context": True, "aia-attribute": False,
                   "aia-keyword": True, "aia-bow": True}  # 0.78 is a 2.5% drop; the attribute is 9 points over majority
    knn = next(r for r in summary if r["defense"] == "x" and r["attack"] == "eia-knn")
    assert knn["floor"] == 0.04  # EIA-1 is read against EIA-2's blind token rate
    table = pu.summary_table(summary)
    assert "| rotten_tomatoes | x | 1 | 1 | 0.780 | +2.5% |" in table and "drop, eia-knn, eia-mlp" in table


def _tiny_decoder_for_smollm2(monkeypatch, tokenizer) -> list:
    """Make the sweep load a tiny random decoder where it asks for SmolLM2 (u-shaped, split after
    block 2); returns the list of requests it received."""
    import copy

    from tests.conftest import tiny_hf_model

    real, asked = pu.load_split, []

    def tiny_split(name, layer, task, *args, **kwargs):
        asked.append((name, layer, task, kwargs.get("protocol")))
        assert asked[-1] == ("smollm2", 2, "generation", "u-shaped")
        return real("tiny", 1, "generation", hf_model=tiny_hf_model("decoder", "generation", layers=3),
                    tokenizer=copy.deepcopy(tokenizer), protocol="u-shaped", seed=kwargs.get("seed", 0))

    monkeypatch.setattr(pu, "load_split", tiny_split)
    return asked


def test_blind_floors_of_a_generation_task_read_the_decoder_tokens_of_prompt_and_continuation(monkeypatch, minilm_tokenizer):
    asked = _tiny_decoder_for_smollm2(monkeypatch, minilm_tokenizer)
    [f] = pu.blind_floors(_tiny(datasets=("bbc_headlines",), max_examples=80, max_victim=20, max_aux=40,
                                generation_max_length=40))
    assert asked == [("smollm2", 2, "generation", "u-shaped")]
    assert f["dataset"] == "bbc_headlines" and f["aux"] == "political_speeches"
    assert 0.0 < f["blind_accuracy"] < 0.2 and 0.05 < f["blind_f1"] < 0.6 and f["blind_set_size"] >= 1


def test_a_generation_point_trains_u_shaped_and_scores_rouge_and_perplexity(tmp_path, monkeypatch, minilm_tokenizer):
    """bbc_headlines through the sweep (a tiny random decoder in place of SmolLM2): the device's
    head and the cloud's middle train until the validation perplexity stops improving; utility is
    the ROUGE-L of greedy headlines, with the test perplexity beside it; the attacks run on the
    decoder's releases; the topic attribute comes from the task's own train rows."""
    _tiny_decoder_for_smollm2(monkeypatch, minilm_tokenizer)
    settings = _tiny(datasets=("bbc_headlines",), defenses=("none", "dchi"), epsilons=(8.0,), max_examples=80,
                     generation_max_length=40, max_new_tokens=5, max_generate=3, batch_size=4)
    rows = pu.sweep(settings, tmp_path, plots=False, progress=False)["rows"]
    assert len(rows) == 8
    for row in rows:
        assert row["utility_metric"] == "rouge-l" and 0.0 <= row["utility"] == row["rouge_l"] <= 1.0
        assert 1.0 < row["perplexity"] < float(minilm_tokenizer.vocab_size) * 10 and row["utility_examples"] == 3
        assert 1 <= row["steps"] <= 4 and row["best_validation"] > 1.0  # a perplexity
        assert row["attack_aux"] == ("bbc_headlines:train" if row["attack"] == "aia-attribute" else "political_speeches")
    assert {r["attribute"] for r in rows} == {"topic"}
    # noise costs perplexity
    ppl = {r["defense"]: r["perplexity"] for r in rows}
    assert ppl["dchi"] > ppl["none"]


def test_generation_settings_leave_classification_fingerprints_alone():
    """Points computed before generation joined the sweep stay valid: a classification point's
    fingerprint ignores the generation-only settings; a generation point's does not."""
    a, b = pu.SweepSettings(), pu.SweepSettings(max_new_tokens=8, max_generate=5, generation_split_layer=3)
    assert a.fingerprint("rotten_tomatoes", 0) == b.fingerprint("rotten_tomatoes", 0)
    assert a.fingerprint("bbc_headlines", 0) != b.fingerprint("bbc_headlines", 0)
    with pytest.raises(ValueError, match="max_new_tokens=64"):
        pu.SweepSettings(max_new_tokens=64, generation_max_length=64).validate()


def test_split_layer_and_subspace_rank_reach_the_point_and_its_fingerprint(tmp_path):
    """A deeper split and a wider label subspace are their own points: the rows say so, the
    fingerprint changes with them, and at their defaults it does not (stored points stay valid)."""
    a = pu.SweepSettings()
    at_defaults = pu.SweepSettings(split_layer=1, subspace_rank=1)
    assert a.fingerprint("rotten_tomatoes", 0) == at_defaults.fingerprint("rotten_tomatoes", 0)
    assert a.fingerprint("rotten_tomatoes", 0) != pu.SweepSettings(split_layer=3).fingerprint("rotten_tomatoes", 0)
    assert a.fingerprint("rotten_tomatoes", 0) != pu.SweepSettings(subspace_rank=2).fingerprint("rotten_tomatoes", 0)
    assert a.fingerprint("bbc_headlines", 0) == pu.SweepSettings(split_layer=3).fingerprint("bbc_headlines", 0)
    for key in ("split_layer", "subspace_rank"):
        with pytest.raises(ValueError, match=f"{key}=0 is invalid; accepted: an integer >= 1"):
            pu.SweepSettings(**{key: 0}).validate()
    rows = pu.sweep(_tiny(defenses=("label-subspace", "label-obfuscator"), epsilons=(64.0,), attacks=("eia-knn",),
                          attack_options={}, split_layer=2, subspace_rank=2), tmp_path, plots=False, progress=False)["rows"]
    assert len(rows) == 4 and {r["split_layer"] for r in rows} == {2}
    by = {r["defense"]: r for r in rows}
    assert (by["label-subspace"]["privacy_projection_rank"], by["label-subspace"]["privacy_learned_rank"]) == (2, None)
    assert (by["label-obfuscator"]["privacy_projection_rank"], by["label-obfuscator"]["privacy_learned_rank"]) == (None, 2)


def test_lora_targets_reach_the_split_and_the_fingerprint(tmp_path, monkeypatch):
    """LoRA on all of the top's linear layers is its own point: the split is built with it and the
    rows say so; at the default the fingerprint of stored points does not move."""
    real, asked = pu.load_split, []
    monkeypatch.setattr(pu, "load_split", lambda *a, **k: asked.append(k.get("lora_targets")) or real(*a, **k))
    rows = pu.sweep(_tiny(defenses=("none",), attacks=("eia-knn",), attack_options={}, lora_targets="all"), tmp_path,
                    plots=False, progress=False)["rows"]
    assert asked == ["all"] and {r["lora_targets"] for r in rows} == {"all"}
    a = pu.SweepSettings()
    assert a.fingerprint("rotten_tomatoes", 0) == pu.SweepSettings(lora_targets="attention").fingerprint("rotten_tomatoes", 0)
    assert a.fingerprint("rotten_tomatoes", 0) != pu.SweepSettings(lora_targets="all").fingerprint("rotten_tomatoes", 0)
    with pytest.raises(ValueError, match="lora_targets='mlp' is invalid; accepted: attention, all"):
        pu.SweepSettings(lora_targets="mlp").validate()
    with pytest.raises(SystemExit):
        pu.main(["--out", "unused", "--lora-targets", "mlp"])


def _store(folder, *rows):
    """Sweep points as the sweep stores them: one file per (defence, ε, seed)."""
    points = folder / "points"
    points.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        (points / f"p{i}.json").write_text(json.dumps({"fingerprint": "f", "point": [], "rows": [row]}))


def test_frontier_figure_pools_seeds_per_label_and_measures_each_drop_against_its_own_none(tmp_path):
    from simulations import frontier_figure as ff

    _store(tmp_path / "split1", _row("none", None, 0, "eia-knn", 0.80, 1.0), _row("dchi", 64.0, 0, "eia-knn", 0.76, 1.0))
    _store(tmp_path / "s3a", _row("none", None, 0, "eia-knn", 0.70, 0.9), _row("label-subspace", 64.0, 0, "eia-knn", 0.70, 0.0))
    # a second folder of the same label: seed 1, and a repeat of seed 0's `none` row that is counted once
    _store(tmp_path / "s3b", _row("none", None, 1, "eia-knn", 0.90, 0.9), _row("none", None, 0, "eia-knn", 0.70, 0.9),
           _row("label-subspace", 64.0, 1, "eia-knn", 0.81, 0.0))
    out = tmp_path / "fig"
    assert ff.main(["--out", str(out), str(tmp_path / "split1"), f"{tmp_path / 's3a'}=split 3",
                    f"{tmp_path / 's3b'}=split 3"]) == 0
    with open(out / "summary.csv", newline="") as f:
        summary = {r["defense"]: r for r in csv.DictReader(f)}
    assert sorted(summary) == ["dchi", "label-subspace (split 3)", "none", "none (split 3)"]
    assert float(summary["dchi"]["drop"]) == pytest.approx(0.05)  # against split 1's none (0.80), not split 3's
    ls = summary["label-subspace (split 3)"]
    assert ls["seeds"] == "2" and float(ls["drop"]) == pytest.approx((0.0 + 0.1) / 2)  # 0.70/0.70 and 0.81/0.90
    assert summary["none (split 3)"]["seeds"] == "2" and float(summary["none (split 3)"]["utility"]) == pytest.approx(0.80)
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6  # 7 stored, the repeat once
    assert (out / "rotten_tomatoes_adaptive.png").stat().st_size > 0


def test_frontier_figure_measures_a_label_without_none_against_another_labels_none_at_the_same_split(tmp_path, capsys):
    from simulations import frontier_figure as ff

    _store(tmp_path / "s1", _row("none", None, 0, "eia-knn", 0.50, 1.0, split_layer=1))
    _store(tmp_path / "s3", _row("none", None, 0, "eia-knn", 0.80, 1.0, split_layer=3),
           _row("label-subspace", 64.0, 0, "eia-knn", 0.78, 0.0, split_layer=3, privacy_projection_rank=2))
    _store(tmp_path / "r4", _row("label-subspace", 64.0, 0, "eia-knn", 0.72, 0.0, split_layer=3, privacy_projection_rank=4))
    _store(tmp_path / "r8", _row("label-subspace", 64.0, 0, "eia-knn", 0.70, 0.0, split_layer=5, privacy_projection_rank=8))
    out = tmp_path / "fig"
    assert ff.main(["--out", str(out), f"{tmp_path / 's1'}=split 1", f"{tmp_path / 's3'}=split 3",
                    f"{tmp_path / 'r4'}=rank 4", f"{tmp_path / 'r8'}=split 5"]) == 0
    assert "rank 4: drops measured against the `none` of split 3" in capsys.readouterr().out
    with open(out / "summary.csv", newline="") as f:
        summary = {r["defense"]: r for r in csv.DictReader(f)}
    # 0.72 against split 3's 0.80 (not split 1's 0.50); the borrowed `none` is not a row of its own
    assert float(summary["label-subspace (rank 4)"]["drop"]) == pytest.approx(0.10)
    assert "none (rank 4)" not in summary and float(summary["label-subspace (split 3)"]["drop"]) == pytest.approx(0.025)
    assert summary["label-subspace (split 5)"]["drop"] == ""  # no `none` at split 5 anywhere: no drop claimed


def test_frontier_figure_refuses_a_folder_without_points(tmp_path):
    from simulations import frontier_figure as ff

    with pytest.raises(ValueError, match="has no stored points"):
        ff.main(["--out", str(tmp_path / "fig"), str(tmp_path)])
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a sweep point"):
        ff.main(["--out", str(tmp_path / "fig"), str(tmp_path)])
    assert not (tmp_path / "fig").exists()


def test_frontier_figure_refuses_to_pool_one_point_measured_two_ways(tmp_path):
    from simulations import frontier_figure as ff

    _store(tmp_path / "r2", _row("label-subspace", 64.0, 0, "eia-knn", 0.70, 0.0, privacy_projection_rank=2))
    _store(tmp_path / "r4", _row("label-subspace", 64.0, 0, "eia-knn", 0.74, 0.1, privacy_projection_rank=4))
    with pytest.raises(ValueError, match="stored differently in .*r2.* and .*r4.*; give the two folders different labels"):
        ff.main(["--out", str(tmp_path / "fig"), str(tmp_path / "r2"), str(tmp_path / "r4")])
    assert ff.main(["--out", str(tmp_path / "fig"), f"{tmp_path / 'r2'}=rank 2", f"{tmp_path / 'r4'}=rank 4"]) == 0
    with open(tmp_path / "fig" / "summary.csv", newline="") as f:
        names = {r["defense"] for r in csv.DictReader(f)}
    assert names == {"label-subspace (rank 2)", "label-subspace (rank 4)"}


def test_frontier_figure_takes_an_earlier_figures_rows_back_per_label_and_pools_new_points_with_them(tmp_path):
    from simulations import frontier_figure as ff

    _store(tmp_path / "s1", _row("none", None, 0, "eia-knn", 0.80, 1.0), _row("dchi", 64.0, 0, "eia-knn", 0.76, 1.0))
    _store(tmp_path / "s3", _row("none", None, 0, "eia-knn", 0.70, 0.9, split_layer=3),
           _row("dchi", 64.0, 0, "eia-knn", 0.63, 0.5, split_layer=3))
    first = tmp_path / "first"
    assert ff.main(["--out", str(first), str(tmp_path / "s1"), f"{tmp_path / 's3'}=split 3"]) == 0
    # the folders are gone; the committed table alone redraws the same figure, cell for cell
    again = tmp_path / "again"
    table = first / "results.csv"
    assert ff.main(["--out", str(again), str(table), f"{table}=split 3"]) == 0
    for stem in ("results", "summary"):
        assert (again / f"{stem}.csv").read_text() == (first / f"{stem}.csv").read_text()
    # a new split-3 point (seed 1) pools with the old split-3 rows, not with the unlabelled ones
    _store(tmp_path / "new", _row("none", None, 1, "eia-knn", 0.90, 0.9, split_layer=3),
           _row("dchi", 64.0, 1, "eia-knn", 0.72, 0.4, split_layer=3))
    both = tmp_path / "both"
    assert ff.main(["--out", str(both), str(table), f"{table}=split 3", f"{tmp_path / 'new'}=split 3"]) == 0
    with open(both / "summary.csv", newline="") as f:
        summary = {r["defense"]: r for r in csv.DictReader(f)}
    assert summary["dchi (split 3)"]["seeds"] == "2"
    assert float(summary["dchi (split 3)"]["drop"]) == pytest.approx((0.1 + 0.2) / 2)  # 0.63/0.70 and 0.72/0.90
    assert float(summary["dchi"]["drop"]) == pytest.approx(0.05)
    # the same point stored two ways in the table and in a folder is refused, as between folders
    _store(tmp_path / "clash", _row("dchi", 64.0, 0, "eia-knn", 0.66, 0.5, split_layer=3))
    with pytest.raises(ValueError, match="stored differently"):
        ff.main(["--out", str(tmp_path / "x"), f"{table}=split 3", f"{tmp_path / 'clash'}=split 3"])
    with pytest.raises(ValueError, match="no row drawn under the label 'split 9'"):
        ff.main(["--out", str(tmp_path / "x"), f"{table}=split 9"])
    with pytest.raises(ValueError, match="is not a file"):
        ff.main(["--out", str(tmp_path / "x"), str(tmp_path / "missing.csv")])


def test_the_sweep_starts_from_the_apps_defaults_and_its_stored_points_keep_their_fingerprints():
    """The sweep keeps no defaults of its own for what RunConfig holds: each mirrored setting is the
    app's default unless SWEEP_OVERRIDES names it. The fingerprints were computed at 04918e1, before
    the settings were derived from RunConfig, so points stored then are still found."""
    from dataclasses import fields

    from privtune_flwr.config import RunConfig

    mirrored = {f.name for f in fields(pu.SweepSettings)} & {f.name for f in fields(RunConfig)}
    assert mirrored >= {"model", "split_layer", "subspace_rank", "subspace_fit", "lora_targets", "batch_size", "max_length",
                        "learning_rate", "max_new_tokens"}
    for name in mirrored:
        expected = pu.SWEEP_OVERRIDES.get(name, getattr(RunConfig(), name))
        assert getattr(pu.SweepSettings(), name) == expected, name
    assert set(pu.SWEEP_OVERRIDES) <= mirrored
    pinned = {("quick", "rotten_tomatoes"): "f9a81c42161375e8", ("quick", "bbc_headlines"): "88cde7a24bccdea4",
              ("quick", "political_debates"): "c66bc40f7faf55a6", ("full", "rotten_tomatoes"): "d51f80967c372f0b",
              ("full", "bbc_headlines"): "da68d939203edb1e", ("full", "political_debates"): "0a3686daaa100ba0"}
    for (which, dataset), digest in pinned.items():
        settings = pu.quick_settings() if which == "quick" else pu.full_settings()
        assert settings.fingerprint(dataset, 0) == digest, (which, dataset)
    assert pu.SweepSettings(**pu.HEADLINE_COMMON).fingerprint("rotten_tomatoes", 0) == "d0c94cb6856db767"
