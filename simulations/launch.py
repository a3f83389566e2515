"""Run the Flower app (``flwr run .``) on a private, self-cleaning local SuperLink.

``python -m simulations.launch [--devices 10] [--actors 2] [--run-config "k=v ..."]``

Why a launcher: offline, Flower's CLI must not try to install dependencies; each run needs its
own ``FLWR_HOME`` and ports so runs never collide; ``flwr run`` exits 0 even when the run failed;
and the SuperLink it starts keeps running afterwards. So this script starts the SuperLink itself
(in its own process group, on free loopback ports), streams the run, reads the final status
with ``flwr ls --format json``, stops every process it started by pid, and exits non-zero if
the run did not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Flower's executables live beside this interpreter (the project venv), which need not be on PATH.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"flower-superlink did not become healthy on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """End the process group this launcher started (the SuperLink and its children)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class TreeMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (SuperLink, ServerApp, Ray)."""

    def __init__(self, root: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.interval, self.peak_mb = root, interval, 0.0
        self._halt = threading.Event()

    def sample(self) -> float:
        page = os.sysconf("SC_PAGE_SIZE")
        parent, rss = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/statm") as f:
                    rss[int(entry)] = int(f.read().split()[1]) * page
                parent[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
        tree, frontier = {self.root}, [self.root]
        while frontier:
            frontier = [p for p, pp in parent.items() if pp in frontier and p not in tree]
            tree.update(frontier)
        return sum(rss.get(p, 0) for p in tree) / 2**20

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.sample())

    def stop(self) -> None:
        self._halt.set()


def run_status(env: dict[str, str]) -> dict:
    """The newest run's record from ``flwr ls --format json``."""
    out = subprocess.run(["flwr", "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise RuntimeError(f"`flwr ls` printed no JSON: {out.stdout[-500:]} {out.stderr[-500:]}") from None
    if not runs:
        raise RuntimeError("`flwr ls` lists no run")
    # This SuperLink is private to one launch, so the newest run is ours.
    return max(runs, key=lambda r: r.get("pending-at") or "")


def launch(devices: int, actors: int, run_config: str, *, app: Path = ROOT, keep_home: bool = False, quiet: bool = False) -> int:
    home = Path(tempfile.mkdtemp(prefix="privtune-flwr-home-"))
    http_port, control_port, fleet_port = free_port(), free_port(), free_port()
    env = flower_env(home, http_port, control_port)
    (home / "local-superlink").mkdir(parents=True)
    log_file = home / "local-superlink" / "superlink.log"
    cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        "--host", "127.0.0.1", "--port", str(http_port),
        "--database", str(home / "local-superlink" / "state.db"),
        "--disable-runtime-dependency-installation",
        "--log-file", str(log_file),
    ]
    superlink = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    print(f"[launch] SuperLink pid {superlink.pid} on 127.0.0.1:{http_port} (control {control_port}); FLWR_HOME={home}", flush=True)
    memory = TreeMemory(superlink.pid)
    memory.start()
    t_start = time.perf_counter()
    code = 1
    try:
        wait_healthy(http_port, superlink)
        cpus = max(1, (os.cpu_count() or 2) // max(1, actors))
        fed = f"num-supernodes={devices} client-resources-num-cpus={cpus} client-resources-num-gpus=0.0"
        args = ["flwr", "run", str(app), "--stream", "--federation-config", fed]
        if run_config:
            args += ["--run-config", run_config]
        subprocess.run(args, cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL if quiet else None)
        status = run_status(env)
        state = status.get("status", "")
        print(f"[launch] run {status.get('run-id')} status: {state}", flush=True)
        code = 0 if state == "finished:completed" else 1
        print(f"[launch] wall {time.perf_counter() - t_start:.1f} s, peak RSS of all run processes {memory.peak_mb:.0f} MB", flush=True)
    except Exception as exc:  # noqa: BLE001 - report, clean up, and fail the command
        print(f"[launch] failed: {exc}", file=sys.stderr, flush=True)
        if log_file.exists():
            print(log_file.read_text()[-4000:], file=sys.stderr)
    finally:
        memory.stop()
        stop(superlink)
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
    return code


def launch_deployment(num_nodes: int, run_config: str, *, app: Path = ROOT, timeout: float = 900.0) -> int:
    """A real deployment on loopback: one SuperLink, ``num_nodes`` SuperNodes, then ``flwr run``.

    Every process runs in its own process group and is stopped by pid at the end.
    """
    home = Path(tempfile.mkdtemp(prefix="privtune-flwr-deploy-"))
    port = free_port()
    env = flower_env(home, free_port(), free_port())
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []
    code = 1
    try:
        logs = home / "logs"
        logs.mkdir()
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"],
            env=env, stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(superlink)
        wait_healthy(port, superlink)
        for pid in range(num_nodes):
            procs.append(subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--node-config", f"partition-id={pid} num-partitions={num_nodes}",
                 "--host", "127.0.0.1", "--port", str(free_port())],
                env=env, stdout=open(logs / f"supernode-{pid}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
            ))
        args = ["flwr", "run", str(app), "deploy", "--stream"]
        if run_config:
            args += ["--run-config", run_config]
        subprocess.run(args, cwd=ROOT, env=env, check=False, timeout=timeout)
        env_ls = dict(env)
        out = subprocess.run(["flwr", "ls", "deploy", "--format", "json"], cwd=ROOT, env=env_ls, capture_output=True, text=True, timeout=120)
        runs = json.loads(out.stdout).get("runs", [])
        state = max(runs, key=lambda r: r.get("pending-at") or "").get("status", "") if runs else "no run"
        print(f"[deploy] status: {state}", flush=True)
        code = 0 if state == "finished:completed" else 1
        if code:
            for f in sorted(logs.iterdir()):
                print(f"--- {f.name}\n{f.read_text()[-3000:]}", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(home, ignore_errors=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10, help="simulated devices (SuperNodes); default 10")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors, i.e. devices computed at once; default 2")
    parser.add_argument("--run-config", default="", help='overrides of [tool.flwr.app.config], e.g. "num-rounds=2 defense=\'none\'"')
    parser.add_argument("--out", default="outputs/run", help="results folder (results.json, history, checkpoints)")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary FLWR_HOME (logs) after the run")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices={args.devices} must be >= 1")
    if args.actors < 1:
        parser.error(f"--actors={args.actors} must be >= 1")
    out = Path(args.out).resolve()
    overrides = f"output-dir='{out}' min-devices={args.devices}"
    if "devices-per-round" not in args.run_config:
        overrides += f" devices-per-round={min(args.devices, 5)}"
    code = launch(args.devices, args.actors, f"{overrides} {args.run_config}".strip(), keep_home=args.keep_home)
    results = out / "results.json"
    if code == 0 and results.exists():
        summary = json.loads(results.read_text())
        print("[launch] final:", json.dumps(summary["final"]), f"wall {summary['wall-seconds']:.1f} s")
        print(f"[launch] results: {results}")
    return code


if __name__ == "__main__":
    sys.exit(main())
