"""The launcher without a Flower run: bad input refused before anything starts, and every
process of a launch (descendants, detached or orphaned ones included) stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privtune_flwr import launch, preflight

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if the launcher tries to start anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("the launcher started a process for a configuration it should refuse")
    monkeypatch.setattr(launch, "Processes", refuse)


@pytest.mark.parametrize("args,message", [
    (["--run-config", "num-round=3"], "error: unknown key 'num-round'; did you mean 'federation.num-rounds'?"),
    (["--run-config", "defense.name='nonsense'"], "error: defense.name='nonsense' is outside the accepted range: none, dchi, gaussian, privtune"),
    (["--run-config", "defense.epsilon=0.0"], "error: defense.epsilon=0.0 is outside the accepted range: (0, inf)"),
    (["--run-config", "num-rounds=="], "error: --run-config 'num-rounds==' is not a list of key=value pairs"),
    (["--devices", "3", "--run-config", "federation.min-devices=4"], "error: federation.min-devices=4 is outside the accepted range for --devices 3: 1..3"),
    (["--devices", "3", "--run-config", "federation.devices-per-round=5"], "error: federation.devices-per-round=5 is outside the accepted range for --devices 3: 1..3"),
    (["--device-policy", "allow-reproducible-noise"], "error: --device-policy 'allow-reproducible-noise' is not a list of key=value pairs"),
])
def test_bad_input_is_refused_before_anything_starts(no_processes, capsys, args, message):
    assert launch.main(args) == 2
    assert capsys.readouterr().err.startswith(message)


def test_a_mistyped_key_is_refused_within_five_seconds():
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--run-config", "num-round=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown key 'num-round'; did you mean 'federation.num-rounds'?"
    assert seconds < 5.0


@pytest.mark.parametrize("text", ["federation.num-rounds=2 defense.name='none' defense.epsilon=1e-3", 'model.name="a b" run.seed=3 flag=true', ""])
def test_pairs_parse_as_flower_parses_them(text):
    from flwr.common.config import parse_config_args

    assert launch.parse_pairs(text, "--run-config") == parse_config_args([text])


def test_launcher_defaults_keep_min_devices_below_the_device_count(monkeypatch):
    seen = {}
    monkeypatch.setattr(launch, "launch", lambda devices, actors, run_config, **kw: seen.update(config=run_config) or 0)
    assert launch.main(["--devices", "10"]) == 0
    assert "federation.devices-per-round=5" in seen["config"] and "federation.min-devices=5" in seen["config"]
    assert launch.main(["--devices", "3"]) == 0
    assert "federation.devices-per-round=3" in seen["config"] and "federation.min-devices=2" in seen["config"]
    assert launch.main(["--devices", "1"]) == 0
    assert "federation.devices-per-round=1" in seen["config"] and "federation.min-devices=1" in seen["config"]
    assert launch.main(["--devices", "4", "--run-config", "federation.min-devices=4"]) == 0
    assert "federation.min-devices=4" in seen["config"]


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_stop_ends_descendants_that_left_the_group_or_lost_their_parent(tmp_path):
    procs = launch.Processes()
    pids = tmp_path / "pids"
    # a leader with a child in its group and a grandchild in a session of its own
    leader = procs.start("leader", ["bash", "-c", f"sleep 300 & echo $! >> {pids}; setsid sleep 301 & echo $! >> {pids}; wait"],
                         dict(os.environ))
    deadline = time.monotonic() + 10
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [int(p) for p in pids.read_text().split()]
    assert sorted(procs.alive()) == sorted([leader.pid] + children)
    os.kill(leader.pid, signal.SIGKILL)  # whatever died first: here the leader
    leader.wait()
    assert all(_state(p) not in (None, "Z") for p in children)  # orphans, still running
    procs.stop()
    assert procs.alive() == []
    assert all(_state(p) in (None, "Z") for p in children)


def test_stop_ends_a_retitled_orphan_whose_environment_no_longer_shows_the_tag(tmp_path):
    """Ray retitles its agents with setproctitle, which overwrites what /proc/PID/environ reads
    (CI once left a `ray::RuntimeEnvAgent` behind this way). Once its parent dies, neither the tag
    nor the parent links find it: the launcher has to remember it."""
    procs = launch.Processes()
    ready, release = tmp_path / "ready", tmp_path / "release"
    child = (f"import os, time, ray._raylet as r; r.setproctitle('ray::Retitled' + ' ' * 200); "
             f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(300)")
    parent = procs.start("parent", [sys.executable, "-c",
                                    f"import subprocess, sys, os, time\n"
                                    f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n"
                                    f"while not os.path.exists({str(release)!r}): time.sleep(0.05)\n"],
                         dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        orphan = int(ready.read_text())
        assert orphan in procs.alive()  # seen through its parent
        assert orphan not in launch.tagged_processes(procs.tag)  # the tag is gone from its environment
        release.touch()
        parent.wait(timeout=30)
        assert _state(orphan) not in (None, "Z")  # an orphan now, still running
        assert orphan in procs.alive()  # remembered
        procs.stop()
        assert procs.alive() == [] and _state(orphan) in (None, "Z")
    finally:
        release.touch()
        if ready.exists():  # whatever failed above, the orphan does not outlive the test
            pid = int(ready.read_text())
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ray::Retitled" in f.read():  # still ours, not a reused pid
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        procs.stop()


def test_processes_of_one_name_are_stopped_alone(tmp_path):
    procs = launch.Processes()
    env = dict(os.environ)
    keep = procs.start("keep", ["sleep", "300"], env)
    drop = procs.start("drop", ["bash", "-c", "setsid sleep 302 & wait"], env)
    time.sleep(0.5)
    assert len(procs.alive("drop")) == 2
    procs.stop("drop")
    assert procs.alive("drop") == [] and drop.poll() is not None
    assert keep.poll() is None and procs.alive("keep") == [keep.pid]
    procs.stop()
    assert procs.alive() == []


class _Stop(Exception):
    pass


def test_device_policy_reaches_simulated_devices_and_supernodes(monkeypatch, tmp_path):
    started = {}

    class Recording(launch.Processes):
        def start(self, name, cmd, env, log=None):
            started[name] = (cmd, env)
            if name.startswith("supernode"):
                raise _Stop
            return super().start(name, ["sleep", "60"], env, log)

    monkeypatch.setattr(launch, "Processes", Recording)
    monkeypatch.setattr(launch, "wait_healthy", lambda *a, **k: None)
    monkeypatch.setattr(launch, "follow", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: None)  # `flwr supernode register`
    assert launch.launch(2, 1, "", device_policy="allow-reproducible-noise=true", out_base=tmp_path, quiet=True) == 1
    assert started["superlink"][1][launch.POLICY] == "allow-reproducible-noise=true"
    assert launch.launch_deployment(2, "", device_policy="allow-reproducible-noise=true", out_base=tmp_path, quiet=True) == 1
    cmd, env = started["supernode-0"]
    assert cmd[cmd.index("--node-config") + 1] == "partition-id=0 num-partitions=2 allow-reproducible-noise=true"
    assert "--insecure" not in cmd and "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd
    assert "--insecure" not in started["superlink"][0] and "--enable-supernode-auth" in started["superlink"][0]


# -- what can be known before start (issue 29) ---------------------------------------------------

@pytest.mark.parametrize("config,message", [
    ("data.name='nope'", "error: data.name='nope' is not a bundled dataset or a local file, and Hugging Face ids need network; "
                       f"accepted: the bundled datasets {', '.join(launch.offline_datasets())}; a local .csv/.json/.jsonl file"),
    ("model.split-layer=99", "error: model.split-layer=99 is outside the accepted range for model.name='minilm': 0..6 (its config has 6 blocks)"),
    ("model.name='roberta-base'", "error: model.name='roberta-base' cannot be resolved offline"),
    ("defense.name='none'", "error: this device refuses defense.name='none': its floor allows dchi, gaussian, privtune, privtune-noimp, "
                       "privtune-nomean, privtune-random-target, privtune-sampled-target, label-subspace, label-obfuscator"),
])
def test_values_known_before_start_are_refused_in_under_two_seconds(config, message):
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--run-config", config], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seconds = time.perf_counter() - t0
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.splitlines()) == 1 and "…" not in done.stderr
    assert seconds < 2.0


def test_every_problem_of_one_configuration_is_reported_at_once(no_processes, capsys):
    config = ("num-round=3 defense.epsilon=-1.0 data.name='nope' model.split-layer=99 model.max-length=512 defense.release='fresh' "
              "train.batches-per-round=100")
    assert launch.main(["--devices", "0", "--run-config", config]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("error: ") for line in lines)
    for start in ("error: --devices=0 is outside the accepted range: >= 1", "error: unknown key 'num-round'",
                  "error: defense.epsilon=-1.0 is outside", "error: data.name='nope'", "error: model.split-layer=99 is outside",
                  "error: this device refuses model.max-length=512", "error: this device refuses defense.release='fresh'",
                  "error: this device refuses num-batches=100"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)


def test_the_device_policy_given_is_the_one_checked(no_processes, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(launch, "launch", lambda devices, actors, run_config, **kw: seen.update(kw) or 0)
    monkeypatch.delenv("PRIVTUNE_DEVICE_POLICY", raising=False)
    assert launch.main(["--devices", "3", "--run-config", "defense.name='none'", "--device-policy", "allowed-defenses='*'"]) == 0
    assert launch.main(["--devices", "3", "--run-config", "defense.epsilon=100.0", "--device-policy", "max-epsilon=128"]) == 0
    assert launch.main(["--devices", "3", "--run-config", "defense.epsilon=100.0"]) == 2
    assert "this device refuses defense.epsilon=100.0: its floor is max-epsilon=64.0" in capsys.readouterr().err


def test_collect_errors_gives_every_problem_and_keeps_the_rest():
    from privtune_flwr.config import RunConfig, collect_errors

    cfg, errors = collect_errors({"federation.num-round": 3, "run.seed": "x", "model.max-length": 2, "defense.epsilon": -1.0, "federation.num-rounds": 2})
    assert errors == ["unknown key 'federation.num-round'; did you mean 'federation.num-rounds'?", "run.seed='x' is not a valid int",
                      "model.max-length=2 is outside the accepted range: 8..4096", "defense.epsilon=-1.0 is outside the accepted range: (0, inf)"]
    assert cfg.num_rounds == 2 and cfg.seed == 0
    assert collect_errors(RunConfig().to_flower())[1] == []
    with pytest.raises(ValueError, match="model.max-length=2"):  # outside collect_errors, the first problem raises, as before
        RunConfig(max_length=2)


def test_split_layer_is_checked_against_the_depth_in_a_local_models_config(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "num_hidden_layers": 2}))
    cfg = preflight.RunConfig(model=str(tmp_path), split_layer=3)
    assert preflight.model_errors(cfg) == [f"model.split-layer=3 is outside the accepted range for model.name={str(tmp_path)!r}: 0..2 "
                                        "(its config has 2 blocks)"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert "accepted families (model_type): bert, roberta, xlm-roberta, llama, mistral, qwen2" in preflight.model_errors(cfg)[0]
    # the names the launcher reads from the modules' source are the modules' own
    from privtune_flwr import data, models

    assert launch.offline_datasets() == data.DATASETS
    assert preflight.model_families() == {k: f.kind for k, f in models.FAMILIES.items()}
    assert preflight.model_config("smollm2")[0]["num_hidden_layers"] == 30


def test_the_checks_before_start_import_neither_torch_nor_datasets():
    code = ("import sys; from privtune_flwr import launch; "
            "launch.main(['--run-config', \"federation.protocol='u-shaped' label-protection.method='marvell' data.name='nope'\"]); "
            "print(sorted(m for m in ('torch', 'datasets', 'pandas', 'transformers', 'flwr') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_serverapp_refuses_at_start_what_the_launcher_refuses():
    from strategies.server_app import check_before_start

    bad = {**launch.app_defaults(), "model.split-layer": 99, "defense.name": "none", "data.name": "nope"}
    with pytest.raises(ValueError) as simulated:
        check_before_start(bad, simulated=True)
    assert str(simulated.value).startswith("3 problems in the run config: data.name='nope'")
    with pytest.raises(ValueError) as deployed:  # a deployment's devices judge their own data and policy
        check_before_start(bad, simulated=False)
    assert str(deployed.value).startswith("1 problem in the run config: model.split-layer=99 is outside the accepted range")
    assert check_before_start(launch.app_defaults(), simulated=True).model == "minilm"


def test_help_names_the_command_and_lists_every_key_with_its_default():
    from privtune_flwr.config import RunConfig

    done = subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, COLUMNS="120"))
    text = done.stdout
    assert done.returncode == 0 and text.startswith("usage: python -m privtune_flwr.launch ")
    assert "launch.py" not in text and "``" not in text and 'make run ARGS="' in text
    for key in RunConfig().to_flower():
        assert f"\n    {key} = " in text, key
    assert "    defense.epsilon = 64.0  ((0, inf))" in text and "    model.max-length = 64  (8..4096)" in text
    assert "  defense.\n    defense.name = 'label-subspace'" in text
    assert "--run-config \"defense.name='none'\" --device-policy \"allowed-defenses='*'\"" in text


def test_key_files_live_in_a_folder_per_supernode(tmp_path, monkeypatch):
    from privtune_flwr import device_policy

    monkeypatch.delenv("PRIVTUNE_DEPLOYMENT", raising=False)
    fake = tmp_path / "flower-supernode"  # stands in for the SuperNode a ClientApp runs under
    fake.write_text(f'#!/bin/bash\n"{sys.executable}" -c "from privtune_flwr.device_policy import deployment_name; '
                    f'print(deployment_name())"\n')
    fake.chmod(0o755)

    def name(*args):
        return subprocess.run([str(fake), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout.strip()

    a = name("--superlink", "127.0.0.1:9092", "--auth-supernode-private-key", "/deployments/a/supernode-0.key")
    b = name("--superlink", "127.0.0.1:9092", "--auth-supernode-private-key", "/deployments/b/supernode-0.key")
    c = name("--superlink", "127.0.0.1:9192", "--node-config", "partition-id=0 num-partitions=2")
    assert a.startswith("supernode-127.0.0.1_9092-") and c.startswith("supernode-127.0.0.1_9192-")
    assert len({a, b, c}) == 3
    assert a == name("--superlink", "127.0.0.1:9092", "--auth-supernode-private-key", "/deployments/a/supernode-0.key")
    monkeypatch.setenv(device_policy.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setattr(device_policy, "deployment_name", lambda: a)
    policy = object.__new__(device_policy.DevicePolicy)  # key_path reads key-file only
    object.__setattr__(policy, "key_file", "")
    assert device_policy.DevicePolicy.key_path(policy, 0) == tmp_path / "home" / a / "device-0.key"
    assert device_policy.deployment_name.__module__  # (the real one, outside a SuperNode:)
    monkeypatch.undo()
    assert device_policy.deployment_name() == "local"


def test_the_torch_free_stubs_are_installed_only_for_the_launcher_and_never_beside_torch(monkeypatch):
    """The launcher's checks stand torch-free names in for ``privtune_flwr.defenses`` and ``.data``
    in ``sys.modules``. The ServerApp's ``flwr-simulation`` imports the ClientApp from another
    thread meanwhile, and a stub seen by that import breaks it (``cannot import name 'Defense'``):
    only a caller that asks for them (the launcher) gets them, and never where torch is loaded."""
    import sys

    from privtune_flwr import preflight

    names = {"privtune_flwr.defenses", "privtune_flwr.data", "privtune_flwr.label_protection"}
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in the launcher's process
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with preflight._names_only(True):
        assert names <= set(sys.modules)  # the launcher's: stubs
    assert not names & set(sys.modules)  # and gone again
    with preflight._names_only(False):  # the ServerApp's: the real modules, never stubs
        assert not names & set(sys.modules)
    monkeypatch.undo()

    import torch  # noqa: F401 - a process that has torch
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with preflight._names_only(True):
        assert not names & set(sys.modules)


def test_more_devices_than_a_corpus_has_training_rows_are_refused_before_start(no_processes, capsys):
    from privtune_flwr import data
    from privtune_flwr.preflight import FEWEST_TRAINING_ROWS

    # the count is skipped below FEWEST_TRAINING_ROWS devices, so that must be below every bundled corpus
    for name in data.DATASETS:
        assert len(data.load_dataset(name, test_fraction=0.1, seed=0).train) > FEWEST_TRAINING_ROWS, name
    assert launch.main(["--devices", "171", "--run-config", "data.name='political_speeches'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 171 devices share the 170 training rows of 'political_speeches': each device needs at least one; "
                          "accepted: at most 170 devices"), err
    assert launch.main(["--devices", "5", "--run-config", "data.max-examples=4"]) == 2
    assert "5 devices share the 4 training rows of 'rotten_tomatoes'" in capsys.readouterr().err
