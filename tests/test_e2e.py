"""End-to-end Flower runs at tiny scale: the launcher, the README's own commands, TLS with
SuperNode authentication, and what happens when one of the processes dies."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from privtune_flwr.config import RunConfig
from privtune_flwr import launch

ROOT = Path(__file__).resolve().parent.parent
TINY = ("data.max-examples=300 train.batch-size=4 train.batches-per-round=2 model.max-length=24 "
        "federation.eval-examples=10 defense.audit-tokens=64 defense.name='dchi' defense.epsilon=50.0")
QUICK = "federation.num-rounds=1 data.max-examples=300 train.batch-size=4 train.batches-per-round=2 model.max-length=24 federation.eval-examples=10 defense.audit-tokens=0 defense.name='dchi' defense.epsilon=50.0"

pytestmark = pytest.mark.e2e


# -- helpers ---------------------------------------------------------------------------------------

def tagged_env(tmp_path: Path) -> tuple[dict, str]:
    """An environment whose every descendant process carries a fresh tag (found via /proc)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, PRIVTUNE_TEST_TAG=tag, PYTHONUNBUFFERED="1", COLUMNS="200",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env, tag


def with_tag(tag: str) -> list[int]:
    needle = f"PRIVTUNE_TEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def remaining(tag: str, seen, timeout: float = 20.0) -> list[str]:
    """Processes of a launch (tagged now, or seen tagged before) still running ``timeout`` seconds
    after it returned: a process killed with its parent can take a few seconds to go on a busy
    machine, and one that is exiting can no longer show its tag."""
    deadline = time.monotonic() + timeout
    while True:
        left = live(set(with_tag(tag)) | set(seen))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def live(pids) -> list[str]:
    """Those of ``pids`` still running (zombies count as gone), with their command lines."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(f"{pid}: {cmdline(pid)[:120]}")
        except OSError:
            pass
    return out


def kill_tagged(tag: str) -> None:
    for pid in with_tag(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_process(tag: str, needle: str, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for pid in with_tag(tag):
            if needle in cmdline(pid) and pid != proc.pid:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no process running {needle!r} appeared")


def readme_recipe(name: str) -> str:
    """The bash block that follows ``<!-- recipe: name -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- recipe: {name} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README has no recipe {name!r}"
    return match.group(1)


def append_to_flwr_run(script: str, extra: str) -> str:
    lines = script.splitlines()
    runs = [i for i, line in enumerate(lines) if line.startswith("flwr run ")]
    assert len(runs) == 1, "the recipe has one `flwr run` line"
    code = lines[runs[0]].split("#")[0].rstrip()  # the comment stays out of the command
    lines[runs[0]] = f"{code} {extra}"
    return "\n".join(lines) + "\n"


# -- the launcher ------------------------------------------------------------------------------------

def test_launcher_simulation_completes_quietly_into_its_own_run_folder(tmp_path, capfd):
    out = tmp_path / "run"
    code = launch.main(["--devices", "3", "--actors", "2", "--out", str(out), "--run-config", f"federation.num-rounds=2 {TINY}"])
    console = capfd.readouterr().out
    assert code == 0, console
    folder = (out / "latest").resolve()
    assert folder.parent == out and re.fullmatch(r"\d{8}-\d{6}(-\d+)?", folder.name)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["failed-rounds"] == []
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["final"]["round"] == 2 and results["final"]["cloud-steps"] == 2 * 3 * 2  # rounds x devices x batches
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
    assert (folder / "checkpoints" / "round-002.pt").exists()
    # the console: our progress lines, not Flower's or Ray's text (that is in flower.log)
    lines = console.splitlines()
    assert len(lines) <= 20, console
    assert sum(line.startswith("[cloud] [round ") for line in lines) == 2
    assert any(line.startswith("[cloud] final: test accuracy") and "from round 2 of 2" in line for line in lines)
    for noise in ("LOAD REPORT", "ClientAppActor", "Loading weights", "WARNING", "is_gradient_checkpointing", "eps=64"):
        assert noise not in console
    assert "Starting Flower Simulation" in (folder / "flower.log").read_text()


def test_rounds_that_fail_end_nonzero_with_a_summary_and_keep_the_last_good_run(tmp_path, capfd):
    out = tmp_path / "run"
    good = out / "20000101-000000"
    good.mkdir(parents=True)
    (out / "latest").symlink_to(good.name)
    # the run config says 3 classes and Rotten Tomatoes has 2: every device refuses its data, the cloud does not
    code = launch.main(["--devices", "3", "--out", str(out), "--run-config", "federation.num-rounds=2 model.num-labels=3 data.max-examples=30 defense.audit-tokens=0 defense.name='dchi' defense.epsilon=50.0"])
    console = capfd.readouterr().out
    assert code == 1, console
    assert (out / "latest").resolve() == good  # the failed run did not replace the good one
    folder = next(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p != good)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "failed"
    assert [(r["round"], r["did-not"]) for r in results["failed-rounds"]] == [(1, ["train", "evaluate"]), (2, ["train", "evaluate"])]
    assert results["final"]["round"] is None and results["final"]["test-accuracy"] is None
    # round 1 is tried 1 + round-retries (2) times, then the run stops: one console line per attempt
    # and cause, naming the three devices once each; no traceback
    rejected = [line for line in console.splitlines() if "replies rejected" in line]
    assert len(rejected) == 3 and all("3 replies rejected (device 0, device 1, device 2)" in line and "ValueError" in line
                                      for line in rejected)
    assert any("round 2 did not train and evaluate: the run stopped before this round" in line for line in console.splitlines())
    assert "Traceback" not in console
    assert sum(line.startswith("[cloud] rejected over the run: device ") for line in console.splitlines()) == 3
    assert any(line.startswith("[cloud] round 2 did not train and evaluate") for line in console.splitlines())
    full = (folder / "errors.log").read_text()  # the full text is kept
    assert full.count("=== round") == 9 and "raise ValueError(" in full and "\x1b[" not in full  # 3 devices x 3 attempts
    assert "FAILED" in console


# -- when a process dies -----------------------------------------------------------------------------

def _launch_and_kill(tmp_path, args, wait_for, target, settle=0.0):
    env, tag = tagged_env(tmp_path)
    env["PRIVTUNE_CACHE"] = os.environ["PRIVTUNE_CACHE"]
    proc = subprocess.Popen([sys.executable, "-m", "privtune_flwr.launch", "--out", str(tmp_path / "run")] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = set()
    try:
        wait_for_process(tag, wait_for, proc)
        time.sleep(settle)
        victim = wait_for_process(tag, target, proc, timeout=30)
        seen.update(with_tag(tag))
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1.0)
    return proc.returncode, output, seen, tag


@pytest.mark.parametrize("wait_for,target", [
    # once Ray runs, the ServerApp has taken the run (killed earlier, Flower starts it again)
    ("raylet", "flower-superlink"),  # the SuperLink, in the middle of a run
    ("raylet", "flwr-simulation"),   # the ServerApp (and Ray's driver)
])
def test_a_killed_process_fails_the_run_and_leaves_nothing_behind(tmp_path, wait_for, target):
    code, output, seen, tag = _launch_and_kill(tmp_path, ["--devices", "2", "--run-config", QUICK], wait_for, target, settle=3.0)
    assert code == 1, output
    assert "finished:completed" not in output and "FAILED" in output
    assert remaining(tag, seen) == []


def test_terminating_the_launcher_stops_everything_it_started(tmp_path):
    """`kill <launcher pid>` (SIGTERM, as a job scheduler or a shell script sends) cleans up like Ctrl-C."""
    env, tag = tagged_env(tmp_path)
    env["PRIVTUNE_CACHE"] = os.environ["PRIVTUNE_CACHE"]
    proc = subprocess.Popen([sys.executable, "-m", "privtune_flwr.launch", "--out", str(tmp_path / "run"), "--devices", "2",
                             "--run-config", QUICK], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for_process(tag, "raylet", proc)
        seen = set(with_tag(tag))
        proc.terminate()
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1.0)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert remaining(tag, seen) == []


def test_deployment_with_tls_survives_a_lost_supernode_and_leaves_nothing_behind(tmp_path):
    # three SuperNodes, min-devices=2 by the launcher's default: the run goes on without one
    code, output, seen, tag = _launch_and_kill(tmp_path, ["--deployment", "--devices", "3", "--run-config", QUICK],
                                               "flwr-serverapp", "flower-supernode")
    assert "(TLS, SuperNode authentication)" in output
    assert re.search(r"\[launch\] SuperNode \d \(pid \d+\) exited with code -9", output), output
    results = json.loads(((tmp_path / "run" / "latest") if code == 0 else next((tmp_path / "run").glob("2*"))).joinpath("results.json").read_text())
    assert (code == 0) == (results["status"] == "completed"), output
    assert results["rounds"] and results["rounds"][0]["valid-replies"] == 2, output
    assert remaining(tag, seen) == []


def test_unknown_supernode_is_refused(tmp_path):
    from privtune_flwr.certs import make_supernode_keys, make_tls

    env, tag = tagged_env(tmp_path)
    home = tmp_path / "flwr"
    home.mkdir()
    env = {**launch.flower_env(home, launch.free_port(), launch.free_port()), "PRIVTUNE_TEST_TAG": tag}
    tls = make_tls(tmp_path)
    known, known_pub = make_supernode_keys(tmp_path, "known")
    stranger, _ = make_supernode_keys(tmp_path, "stranger")
    port = launch.free_port()
    procs = launch.Processes()
    try:
        superlink = procs.start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(port), "--enable-supernode-auth",
            "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["certfile"]), "--ssl-keyfile", str(tls["keyfile"]),
        ], env, tmp_path / "superlink.log")
        launch.wait_healthy(port, superlink, cafile=tls["ca"])
        launch.write_connection(home, "tls", f"127.0.0.1:{port}", root_certificates=tls["ca"])
        subprocess.run(["flwr", "supernode", "register", str(known_pub), "tls"], env=env, check=True, capture_output=True, timeout=60)
        nodes = {}
        for name, key in (("known", known), ("stranger", stranger)):
            nodes[name] = procs.start(name, ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(tls["ca"]),
                                             "--auth-supernode-private-key", str(key), "--port", str(launch.free_port())],
                                      env, tmp_path / f"{name}.log")
        nodes["stranger"].wait(timeout=60)  # refused: it gives up
        assert nodes["stranger"].returncode != 0
        listed = json.loads(subprocess.run(["flwr", "supernode", "ls", "tls", "--format", "json"], env=env, capture_output=True,
                                           text=True, timeout=60).stdout)
        assert nodes["known"].poll() is None
        assert len(listed["nodes"]) == 1  # the registered one only
        assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()
    finally:
        procs.stop()
    assert live(with_tag(tag)) == []


# -- the README's own commands -----------------------------------------------------------------------

def test_readme_flower_simulation_recipe(tmp_path):
    env, tag = tagged_env(tmp_path)
    env.update(FLWR_HOME=str(tmp_path / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(launch.free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(launch.free_port()))
    out = tmp_path / "run"
    script = append_to_flwr_run(readme_recipe("simulation"),
                                f'--federation-config "num-supernodes=3" --run-config "{QUICK} federation.min-devices=2 federation.devices-per-round=2 run.output-dir=\'{out}\'"')
    seen = set()
    try:
        proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:  # what ran, for the check after the stop (a retitled Ray worker loses its tag)
            seen.update(with_tag(tag))
            time.sleep(1.0)
        stdout, stderr = proc.communicate(timeout=540)
        stopped = time.monotonic()
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        left = remaining(tag, seen - {proc.pid}, timeout=10.0)  # the recipe's last lines stop the local SuperLink
        waited = time.monotonic() - stopped
    finally:
        kill_tagged(tag)
    assert "finished:completed" in stdout, stdout[-3000:]
    assert json.loads((out / "latest" / "results.json").read_text())["status"] == "completed"
    assert left == [] and waited <= 12.0, left


def test_readme_deployment_recipe_with_tls_and_supernode_authentication(tmp_path):
    """The recipe's text exactly as the README prints it (nothing appended): only its environment
    differs (a private FLWR_HOME, free ports, a private device home and run folder)."""
    env, tag = tagged_env(tmp_path)
    ports = [launch.free_port() for _ in range(3)]
    out = tmp_path / "run"
    env.update(FLWR_HOME=str(tmp_path / "flwr"), LINK_PORT=str(ports[0]), NODE_PORTS=f"{ports[1]} {ports[2]}", OUT=str(out),
               PRIVTUNE_DEVICE_HOME=str(tmp_path / "device-home"))
    script = readme_recipe("deployment")
    assert "$OUT" in script and "${OUT:-" in script  # the run folder comes from the environment, with a default
    seen = set()
    try:
        proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while proc.poll() is None:  # every Flower process the recipe started (flwr-serverapp included)
            seen.update(with_tag(tag))
            time.sleep(0.5)
        stdout, stderr = proc.communicate(timeout=60)
        wall = time.monotonic() - t0
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        stopped = time.monotonic()
        left = remaining(tag, seen - {proc.pid}, timeout=10.0)  # step 6 stops everything, by pid
        waited = time.monotonic() - stopped
    finally:
        kill_tagged(tag)
    print(f"deployment recipe as written: {wall:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished:completed" in done.stdout, done.stdout[-3000:]
    results = json.loads((out / "latest" / "results.json").read_text())
    assert results["status"] == "completed" and results["rounds"][0]["valid-replies"] == 2
    assert left == [] and waited <= 12.0, left  # the recipe's last line stops everything it started
    # each SuperNode's device keeps its key in a folder of its own, named for the SuperNode
    keys = sorted((tmp_path / "device-home").glob("*/device-*.key"))
    assert len(keys) == 2 and len({k.parent for k in keys}) == 2, keys
    assert all(k.parent.name.startswith(f"supernode-127.0.0.1_{ports[0]}-") for k in keys)


# -- reproducibility --------------------------------------------------------------------------------

@pytest.mark.skipif("reproducible_noise" not in RunConfig.__dataclass_fields__,
                    reason="needs the run-config key reproducible-noise (device noise is secret otherwise)")
@pytest.mark.parametrize("policy,config", [
    # the research option: the devices consent to noise derived from the seed
    ("allow-reproducible-noise=true", TINY + " defense.reproducible-noise=true"),
    # no noise at all: what remains (data order, sampling, initialisation, training) is seeded
    ("allowed-defenses='*'", TINY.replace("defense.name='dchi' defense.epsilon=50.0", "defense.name='none'")),
])
def test_same_seed_same_numbers(tmp_path, capfd, policy, config):
    numbers = []
    for n in range(2):
        out = tmp_path / f"run{n}"
        code = launch.main(["--devices", "3", "--out", str(out), "--device-policy", policy,
                            "--run-config", f"federation.num-rounds=2 federation.devices-per-round=2 {config}"])
        assert code == 0, capfd.readouterr().out
        rounds = json.loads((out / "latest" / "results.json").read_text())["rounds"]
        numbers.append([(r["train-loss"], r["test-accuracy"], r["test-loss"]) for r in rounds])
    assert numbers[0] == numbers[1]


# -- the u-shaped protocol, generation, and resuming a killed run --------------------------------------

def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_u_shaped_simulation_keeps_labels_on_the_devices(tmp_path):
    out = tmp_path / "run"
    code = launch.main(["--devices", "3", "--out", str(out), "--run-config", f"federation.num-rounds=2 {TINY} federation.protocol='u-shaped'"])
    assert code == 0
    results = _results(out / "latest")
    assert results["status"] == "completed" and results["protocol"] == "u-shaped"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(0 <= r["test-accuracy"] <= 1 and r["train-loss"] > 0 for r in results["rounds"])
    # middle-steps='per-batch': one middle step per device batch (2 rounds x 2 batches x 3 devices)
    assert results["final"]["cloud-steps"] == 2 * 2 * 3


def test_offsite_tuning_through_flower_trains_adapters_and_releases_no_representation(tmp_path):
    """federation.protocol='offsite' through flwr run on Ray: devices that admit it (allow-offsite) tune the
    emulator's adapters, the cloud averages them, the devices score the plugged-in full model; the
    run's summary reports the emulator and says no representation was released."""
    out = tmp_path / "run"
    config = ("federation.protocol='offsite' federation.num-rounds=2 federation.devices-per-round=2 federation.min-devices=2 offsite.local-steps=2 train.batch-size=4 "
              "data.max-examples=200 model.max-length=24 federation.eval-examples=4 offsite.distill-steps=2")
    code = launch.main(["--devices", "3", "--out", str(out), "--device-policy", "allow-offsite=true", "--run-config", config])
    assert code == 0
    results = _results(out / "latest")
    assert results["status"] == "completed" and results["protocol"] == "offsite"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(0 <= r["test-accuracy"] <= 1 and r["train-loss"] > 0 for r in results["rounds"])
    assert results["emulator"]["kept-blocks"] and 0 < results["emulator"]["parameter-ratio"] < 1
    assert "releases no representations" in results["privacy"]["statement"]


def test_generation_with_smollm2_end_to_end(tmp_path):
    out, home = tmp_path / "run", tmp_path / "device-home"
    env = dict(os.environ, PRIVTUNE_DEVICE_HOME=str(home))
    config = ("model.name='smollm2' model.split-layer=2 data.task='generation' federation.protocol='u-shaped' data.name='bbc_headlines' "
              "data.max-examples=40 train.batch-size=2 train.batches-per-round=1 model.max-length=48 federation.eval-examples=2 defense.audit-tokens=0 "
              "defense.name='dchi' defense.epsilon=256.0 federation.num-rounds=1 generation.samples=2 generation.max-new-tokens=3 model.lora-rank=2")
    proc = subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--devices", "2", "--out", str(out),
                           "--device-policy", "max-epsilon=256", "--run-config", config],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(out / "latest")
    assert results["final"]["test-perplexity"] > 1
    assert set(results["generation"]) == {"before", "after"}
    assert all(0 <= g["rouge-l"] <= 1 for g in results["generation"].values())
    # the generated texts stay on the device: in its own file, never in the cloud's results
    kept = (home / "generated-0.txt").read_text()
    assert kept.count("generated:") == 2 * 2
    assert "generated:" not in json.dumps(results)


def test_resume_after_the_server_is_killed_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL the ServerApp mid-run, resume from its folder: every round equals the uninterrupted
    run's, and no completed round is lost (seeded, with reproducible noise the devices consent to)."""
    config = TINY.replace("defense.audit-tokens=64", "defense.audit-tokens=0") + " federation.num-rounds=3 defense.reproducible-noise=true"
    policy = "allow-reproducible-noise=true"
    whole = tmp_path / "whole"
    assert launch.main(["--devices", "3", "--out", str(whole), "--device-policy", policy, "--run-config", config]) == 0
    env, tag = tagged_env(tmp_path)
    env["PRIVTUNE_CACHE"] = os.environ["PRIVTUNE_CACHE"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "privtune_flwr.launch", "--devices", "3", "--out", str(killed),
                             "--device-policy", policy, "--run-config", config], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(killed.glob("2*/checkpoints/round-001.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.5)
        os.kill(wait_for_process(tag, "flwr-simulation", proc, timeout=30), signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, output
    folder = next(killed.glob("2*"))
    done = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert done and done[-1] != "round-003.pt"
    resumed = tmp_path / "resumed"
    assert launch.main(["--devices", "3", "--out", str(resumed), "--device-policy", policy, "--resume", str(folder),
                        "--run-config", config]) == 0
    a, b = _results(whole / "latest"), _results(resumed / "latest")
    assert b["resumed-from"] == str(folder) and [r["round"] for r in b["rounds"]] == [1, 2, 3]
    for mine, theirs in zip(b["rounds"], a["rounds"]):
        for key in ("train-loss", "test-accuracy", "test-loss"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (mine["round"], key)
    assert b["final"]["cloud-steps"] == a["final"]["cloud-steps"]
