"""The screens are named modes (``python -m simulations.screening NAME``), each run here end to end
on a small cache of real bottom outputs (24 sentences per part, split 3)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.screening import __main__ as screens

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screen-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRIVTUNE_SCREEN_CACHE", str(folder))
    from simulations.screening import cache as cache_screen
    from simulations.screening.screen_lib import cache_path

    cache_screen.main(["3", "24"])
    assert cache_path(3) == folder / "cache_m3.pt" and cache_path(3).is_file()
    yield folder
    mp.undo()


def test_every_screen_is_a_named_mode_and_none_reads_its_arguments_when_imported(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])  # a module that read sys.argv[1] at import would fail here
    for name, (module, what) in screens.SCREENS.items():
        loaded = importlib.import_module(f"simulations.screening.{module}")
        assert callable(loaded.main) and what, name
    listed = [p.stem for p in (ROOT / "simulations" / "screening").glob("*.py")]
    assert sorted(listed) == sorted([m for m, _ in screens.SCREENS.values()] + ["__init__", "__main__", "screen_lib"])
    done = subprocess.run([sys.executable, "-m", "simulations.screening", "screen4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "screen 'screen4' is unknown; accepted: cache, basis" in done.stderr


def test_the_basis_screen_scores_every_basis_at_every_rank(cache):
    from simulations.screening import basis

    rows = basis.main(["3", "1,2", "label,random,pca,inverter,lda-pca"])
    assert [(r["k"], r["basis"]) for r in rows] == [(k, b) for k in (1, 2) for b in basis.BASES]
    for r in rows:
        assert 0.0 <= r["reader_val_acc"] <= 1.0 and 0.0 <= r["eia2"] <= 1.0
    # the blind guess depends on the victim's tokens and the auxiliary vocabulary only, not on the basis
    assert len({round(r["blind"], 9) for r in rows}) == 1
    with pytest.raises(SystemExit, match="basis 'eigen': accepted: label, random, pca, inverter, lda-pca"):
        basis.main(["3", "1", "label,eigen"])


def test_device_agreement_compares_each_devices_map_with_one_map(cache):
    from simulations.screening import device_agreement

    rows = device_agreement.main(["3", "3", "iid", "0.5", "12"])
    assert [r["defense"] for r in rows] == ["label-subspace", "label-obfuscator"]
    for r in rows:
        assert sum(r["share_sizes"]) == 24 and r["test_sentences"] == 12 and r["devices"] == 3
        assert len(r["feature_corr"]) == r["rank"] == 2 and r["release_gap"] >= 0.0
        assert 0.0 <= r["reader_one"] <= 1.0 and 0.0 <= r["reader_many"] <= 1.0
    assert json.loads((cache / "device_agreement_s3_3iid.json").read_text()) == json.loads(json.dumps(rows))
    lda, _ = device_agreement.fits_for("lda")
    assert list(lda) == ["label-subspace"]
    with pytest.raises(SystemExit, match="accepted: stepsN, lda, lda-pca"):
        device_agreement.fits_for("steps")


def test_the_federated_map_screen_runs_the_products_fit_phase(cache):
    from simulations.screening import federated_map

    rows = federated_map.main(["closed-form", "3", "iid", "20"])
    (row,) = rows
    assert row["contributions"] == 3 and row["rejected"] == 0 and row["top"][-1][0] == 20
    assert 0.0 <= row["audit_inversion"] <= 1.0 and 0.0 <= row["eia1_adaptive"] <= 1.0 and 0.0 <= row["eia2_adaptive"] <= 1.0
    stored = [json.loads(line) for line in (cache / "federated_map.jsonl").read_text().splitlines()]
    assert stored[-1] == json.loads(json.dumps(row))
    with pytest.raises(SystemExit, match="accepted: closed-form, reader, reader-noiseless, reader-cloud, one-map"):
        federated_map.main(["lda"])


def test_the_top_recipe_screen_trains_the_asked_top_and_puts_the_defaults_back():
    from privtune_flwr import models
    from simulations import privacy_utility as pu
    from simulations.screening import top_recipe

    targets, load_split = models.LORA_TARGETS["encoder"], pu.load_split
    out = top_recipe.main(["0", "1", "query,value", "1", "4", "1e-3", "10", "200"])
    assert out["steps"] == 10 and out["lora_rank"] == 4 and out["pooler"] and 0.0 <= out["accuracy"] <= 1.0
    assert models.LORA_TARGETS["encoder"] == targets and pu.load_split is load_split
    # the pooler (384 x 384 + 384) is trained beside LoRA of rank 4 on query and value, not without it
    plain = top_recipe.main(["0", "1", "query,value", "0", "4", "1e-3", "10", "200"])
    assert out["trainable"] - plain["trainable"] == 384 * 384 + 384


def test_the_top_utility_screen_is_the_headline_at_split_3_with_its_stored_fingerprint():
    from simulations.screening import top_utility

    settings = top_utility.settings(0, ("none", "label-subspace"))
    assert (settings.split_layer, settings.subspace_rank, settings.lora_targets, settings.decays) == (3, 2, "all", 2)
    assert settings.attacks == ("eia-knn",) and settings.protocols == ("adaptive",)
    # as the script built it at 04918e1, so its stored points are still found
    assert settings.fingerprint("rotten_tomatoes", 0) == "acc701a2996b1167"
