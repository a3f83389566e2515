"""End-to-end Flower runs at tiny scale: `flwr run .` in simulation, and a real loopback deployment."""

import json

import pytest

from simulations import launch

TINY = ("max-examples=300 batch-size=4 batches-per-round=2 max-length=24 "
        "eval-examples=10 audit-tokens=64 defense='dchi' epsilon=50.0")

pytestmark = pytest.mark.e2e


def test_flwr_run_simulation_completes_and_writes_results(tmp_path):
    out = tmp_path / "run"
    code = launch.main(["--devices", "3", "--actors", "2", "--out", str(out), "--run-config", f"num-rounds=2 {TINY}"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["final"]["cloud-steps"] == 2 * 3 * 2  # rounds x devices x batches
    assert 0.0 <= results["final"]["test-accuracy"] <= 1.0
    assert results["rounds"][0]["num-examples"] == 3 * 2 * 4
    assert 0.0 <= results["final"]["self-audit-knn"] <= 1.0
    privacy = results["privacy"]
    assert privacy["epsilon-per-token-max"] == pytest.approx(50.0)
    assert privacy["epsilon-per-sequence-max"] == pytest.approx(50.0 * 24)  # max-length tokens
    # release once: the test split goes out at both evaluations, as the same tensors: one release
    assert privacy["releases-per-test-example-max"] == 1
    assert privacy["per-test-sequence-composed"]["epsilon"] == pytest.approx(50.0 * 24)
    assert privacy["releases-per-train-example-max"] == 1
    assert "OS entropy" in privacy["guarantee"] and not privacy["reproducible-noise"]
    assert (out / "checkpoints" / "round-002.pt").exists()


def test_failed_run_exits_nonzero(tmp_path):
    # An unknown dataset makes the ServerApp fail; Flower's CLI still exits 0, the launcher must not.
    code = launch.main(["--devices", "2", "--out", str(tmp_path), "--run-config", "dataset='no_such_dataset' num-rounds=1"])
    assert code != 0


def test_deployment_superlink_and_two_supernodes(tmp_path):
    config = f"{TINY} num-rounds=1 min-devices=2 devices-per-round=2 output-dir='{tmp_path}'"
    assert launch.launch_deployment(2, config) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rounds"][0]["valid-replies"] == 2
