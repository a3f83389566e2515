"""The launcher without a Flower run: bad input refused before anything starts, and every
process of a launch (descendants, detached or orphaned ones included) stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations import launch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if the launcher tries to start anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("the launcher started a process for a configuration it should refuse")
    monkeypatch.setattr(launch, "Processes", refuse)


@pytest.mark.parametrize("args,message", [
    (["--run-config", "num-round=3"], "error: unknown key 'num-round'; did you mean 'num-rounds'?"),
    (["--run-config", "defense='nonsense'"], "error: defense='nonsense' is outside the accepted range: none, dchi, gaussian, privtune"),
    (["--run-config", "epsilon=0.0"], "error: epsilon=0.0 is outside the accepted range: (0, inf)"),
    (["--run-config", "num-rounds=="], "error: --run-config 'num-rounds==' is not a list of key=value pairs"),
    (["--devices", "3", "--run-config", "min-devices=4"], "error: min-devices=4 is outside the accepted range for --devices 3: 1..3"),
    (["--devices", "3", "--run-config", "devices-per-round=5"], "error: devices-per-round=5 is outside the accepted range for --devices 3: 1..3"),
    (["--device-policy", "allow-reproducible-noise"], "error: --device-policy 'allow-reproducible-noise' is not a list of key=value pairs"),
])
def test_bad_input_is_refused_before_anything_starts(no_processes, capsys, args, message):
    assert launch.main(args) == 2
    assert capsys.readouterr().err.startswith(message)


def test_a_mistyped_key_is_refused_within_five_seconds():
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simulations.launch", "--run-config", "num-round=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown key 'num-round'; did you mean 'num-rounds'?"
    assert seconds < 5.0


@pytest.mark.parametrize("text", ["num-rounds=2 defense='none' epsilon=1e-3", 'model="a b" seed=3 flag=true', ""])
def test_pairs_parse_as_flower_parses_them(text):
    from flwr.common.config import parse_config_args

    assert launch.parse_pairs(text, "--run-config") == parse_config_args([text])


def test_launcher_defaults_keep_min_devices_below_the_device_count(monkeypatch):
    seen = {}
    monkeypatch.setattr(launch, "launch", lambda devices, actors, run_config, **kw: seen.update(config=run_config) or 0)
    assert launch.main(["--devices", "10"]) == 0
    assert "devices-per-round=5" in seen["config"] and "min-devices=5" in seen["config"]
    assert launch.main(["--devices", "3"]) == 0
    assert "devices-per-round=3" in seen["config"] and "min-devices=2" in seen["config"]
    assert launch.main(["--devices", "1"]) == 0
    assert "devices-per-round=1" in seen["config"] and "min-devices=1" in seen["config"]
    assert launch.main(["--devices", "4", "--run-config", "min-devices=4"]) == 0
    assert "min-devices=4" in seen["config"]


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
