"""The app's main job on a non-BERT encoder given as a folder (issue 25): a tiny random RoBERTa
saved with ``save_pretrained`` (tests/conftest.py, ``roberta_words_folder``) fine-tuned by the
Flower app through the launcher, with the default defence (label-subspace, fitted by each device
on its labelled share). About 90 s on 2 loaded cores."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("model.split-layer=1 model.num-labels=2 federation.num-rounds=1 data.max-examples=300 train.batch-size=4 train.batches-per-round=2 model.max-length=24 "
         "federation.eval-examples=10 defense.audit-tokens=64 model.lora-rank=2")

pytestmark = pytest.mark.e2e


def _launch(out: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRIVTUNE_DEVICE_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--devices", "2", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_the_app_fine_tunes_a_roberta_folder_behind_the_default_label_subspace(roberta_words_folder, tmp_path):
    config = f"model.name='{roberta_words_folder}' {SMALL}"
    # the device's floor refuses a local folder it has not listed, before anything starts
    refused = _launch(tmp_path / "refused", tmp_path / "home", "--run-config", config)
    assert refused.returncode != 0
    assert f"this device refuses model.name='{roberta_words_folder}'" in refused.stdout + refused.stderr
    assert not (tmp_path / "refused" / "latest").exists()

    out = tmp_path / "run"
    proc = _launch(out, tmp_path / "home", "--device-policy", "allowed-models='*'", "--run-config", config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(out / "latest")
    assert results["status"] == "completed" and results["failed-rounds"] == []
    assert results["config"]["model.name"] == roberta_words_folder and results["config"]["defense.name"] == "label-subspace"
    [round1] = results["rounds"]
    assert round1["valid-replies"] == 2 and round1["num-examples"] == 2 * 2 * 4  # devices x batches x batch size
    assert 0.0 <= results["final"]["test-accuracy"] <= 1.0 and 0.0 <= results["final"]["test-macro-f1"] <= 1.0
    for key in ("train-loss", "test-loss"):
        assert math.isfinite(round1[key]) and round1[key] > 0, key
    assert results["final"]["cloud-steps"] == 2 * 2
    # the cloud trains RoBERTa's own classifier on <s> (dense 32x32 + out_proj 32x2, no pooler) and
    # rank-2 LoRA on block 2's query and value: 1,056 + 66 + 2 x 2 x (2 x 32) = 1,378
    assert results["trainable-parameters"] == 1378
    # the label map leaves the cloud nothing to invert: the device's own KNN self-audit
    assert 0.0 <= results["final"]["self-audit-knn"] <= 0.1
