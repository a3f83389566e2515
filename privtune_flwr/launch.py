"""Run the Flower app (``flwr run .``) on a private, self-cleaning loopback Flower.

``python -m privtune_flwr.launch [--devices 10] [--actors 2] [--run-config "k=v ..."]`` runs a
simulation; ``--deployment`` runs a real deployment instead (one SuperLink and ``--devices``
SuperNodes, with TLS and SuperNode authentication, on 127.0.0.1).

Why a launcher, when ``flwr run .`` exists (the README shows both): it checks the run
configuration before anything starts; each run gets its own ``FLWR_HOME`` and free ports, so runs
never collide; Flower's CLI must not install dependencies offline; ``flwr run`` exits 0 even when
the run failed, so the launcher reads the final status with ``flwr ls --format json``; and it
stops every process it started, and every process those started, whichever of them ended first.
The console shows the app's own progress lines; Flower's and Ray's full output goes to
``flower.log`` in the run's folder.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from . import config as _config_module
from .config import RunConfig, collect_errors
from .preflight import ROOT, app_defaults, offline_datasets, parse_pairs, preflight, ray_address_errors, share_errors
TAG = "PRIVTUNE_LAUNCH"  # environment variable that marks every process of one launch
POLICY = "PRIVTUNE_DEVICE_POLICY"  # a device policy ("k=v ...") for simulated devices


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
        # Ray's start-up tip about GPU visibility: this project runs without GPUs.
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Flower's executables live beside this interpreter (the project venv), which need not be on PATH.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


# ------------------------------------------------------------------------------------------------
# the run configuration, checked before any process starts


# ------------------------------------------------------------------------------------------------
# processes


def _become_subreaper() -> None:
    """Let orphaned descendants (a killed SuperNode's SuperExec) be re-parented to this process,
    where they stay visible, instead of to init. Linux only; elsewhere the tag sweep suffices."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def tagged_processes(tag: str) -> dict[int, str]:
    """Live processes whose environment holds ``PRIVTUNE_LAUNCH=<tag>:<name>``: pid -> name.
    Children inherit the environment, so this finds descendants however they were started,
    detached or re-parented, as long as they keep their environment (see :meth:`Processes.alive`)."""
    needle = f"{TAG}={tag}:".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        for variable in variables:
            if variable.startswith(needle):
                found[int(entry)] = variable[len(needle):].decode(errors="replace")
                break
    return found


def _process_table() -> dict[int, tuple[str, int, str]]:
    """Every process now: pid -> (state, parent pid, start time in clock ticks since boot)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            table[int(entry)] = (fields[0], int(fields[1]), fields[19])
        except (OSError, IndexError, ValueError):
            continue
    return table


class Processes:
    """Processes this launch starts, each in its own session and tagged, and their descendants."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, tuple[str, str]] = {}  # pid -> (start time, the started process it belongs to)
        self._lock = threading.Lock()  # the memory sampler calls alive() from its own thread

    def start(self, name: str, cmd: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
        env = {**env, TAG: f"{self.tag}:{name}"}
        out = open(log, "w") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not None:
                out.close()
        with self._lock:
            self.procs[name] = proc
        return proc

    def popen(self, name: str, cmd: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        """Like :meth:`start`, with the caller's own stdout/stderr arguments."""
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, TAG: f"{self.tag}:{name}"}, start_new_session=True, **kwargs)
        with self._lock:
            self.procs[name] = proc
        return proc

    def alive(self, name: str | None = None) -> list[int]:
        """Live processes of this launch (of the one started as ``name``, with its descendants).

        Three ways in, because no one of them sees every process: the tag in the environment
        (finds detached and re-parented descendants), the parent links from what this launch
        started, and every process once seen by either (Ray retitles its workers and agents with
        ``setproctitle``, which overwrites the memory ``/proc/PID/environ`` reads, so a retitled
        process loses its tag; one whose parent died is no longer linked to us either).
        A remembered pid counts only while its start time matches, so a reused pid is not ours."""
        with self._lock:
            return self._alive(name)

    def _alive(self, name: str | None) -> list[int]:
        table = _process_table()
        roots: dict[int, str] = {}
        for label, proc in self.procs.items():
            if name in (None, label) and proc.poll() is None:  # an exited one's pid may be reused
                roots[proc.pid] = label
        for pid, label in tagged_processes(self.tag).items():
            if name in (None, label):
                roots[pid] = label
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        found: dict[int, str] = {}
        stack = [(pid, label) for pid, label in roots.items() if pid in table]
        while stack:
            pid, label = stack.pop()
            if pid in found:
                continue
            found[pid] = label
            stack.extend((child, label) for child in children.get(pid, ()))
        for pid, label in found.items():
            self.seen.setdefault(pid, (table[pid][2], label))
        for pid, (start, label) in self.seen.items():
            if pid in table and table[pid][2] == start and name in (None, label):
                found.setdefault(pid, label)
        return sorted(pid for pid in found if table[pid][0] != "Z" and pid != os.getpid())

    def stop(self, name: str | None = None, grace: float = 10.0) -> None:
        """End ``name`` (or everything) with its descendants: SIGTERM to each process group,
        then to every process :meth:`alive` finds, SIGKILL after ``grace`` seconds."""
        targets = [self.procs[name]] if name is not None else list(self.procs.values())
        for proc in targets:
            # The group outlives its leader: signal it even when the leader has exited.
            _signal(lambda sig, pid=proc.pid: os.killpg(pid, sig), signal.SIGTERM)
        for pid in self.alive(name):
            _signal(lambda sig, pid=pid: os.kill(pid, sig), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (left := self.alive(name)) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.2)
        # SIGKILL what is left; scan again, since a dying parent may just have started a child
        for _ in range(10):
            if not left:
                break
            for pid in left:
                _signal(lambda sig, pid=pid: os.kill(pid, sig), signal.SIGKILL)
            time.sleep(0.2)
            self._reap()
            left = self.alive(name)
        for proc in targets:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.2)
        self._reap()

    def _reap(self) -> None:
        """Collect exited orphans re-parented to this process (see :func:`_become_subreaper`)."""
        mine = {p.pid for p in self.procs.values()}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in mine:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
                if state == "Z" and int(ppid) == os.getpid():
                    os.waitpid(int(entry), os.WNOHANG)
            except (OSError, ValueError, ChildProcessError):
                continue


def _signal(send, sig) -> None:
    try:
        send(sig)
    except (ProcessLookupError, PermissionError):
        pass


class Memory(threading.Thread):
    """Samples the summed RSS of every process of a launch (SuperLink, ServerApp, Ray, actors)."""

    def __init__(self, procs: Processes, interval: float = 1.0):
        super().__init__(daemon=True)
        self.procs, self.interval, self.peak_mb = procs, interval, 0.0
        self._halt = threading.Event()

    def sample(self) -> float:
        page, total = os.sysconf("SC_PAGE_SIZE"), 0
        for pid in self.procs.alive():
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.sample())

    def stop(self) -> None:
        self._halt.set()


# ------------------------------------------------------------------------------------------------
# what the user sees

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ACTOR = re.compile(r"^\((?:\w+) pid=\d+(?:, ip=[^)]*)?\)\s?")
_FLOWER_ERROR = re.compile(r"^(?:ERROR|CRITICAL)\s*:\s*(.*)")


class Console:
    """Filters the ``flwr run --stream`` output: the app's own lines ([cloud], [device]) go to the
    screen, every line goes to ``log``. Flower's error lines are counted, not shown: device errors
    are summarised by the cloud, and a run that fails says why in its status."""

    def __init__(self, log: Path, *, quiet: bool = False):
        self.log = log
        self.quiet = quiet
        self.errors = 0
        self.run_folder: Path | None = None
        self.run_id: str | None = None
        self._file = open(log, "a", buffering=1)

    def say(self, text: str) -> None:
        self._file.write(text + "\n")
        if not self.quiet:
            print(text, flush=True)

    def feed(self, raw: str) -> None:
        self._file.write(raw if raw.endswith("\n") else raw + "\n")
        text = _ACTOR.sub("", _ANSI.sub("", raw.rstrip("\n")))
        if text.startswith("[cloud] run folder: "):
            self.run_folder = Path(text.split(": ", 1)[1].strip())
        if text.startswith(("[cloud]", "[device]")):
            if not self.quiet:
                print(text, flush=True)
        elif text.startswith("Successfully started run "):
            self.run_id = text.rsplit(" ", 1)[-1]
            if not self.quiet:
                print(f"[launch] Flower run {self.run_id} started", flush=True)
        elif _FLOWER_ERROR.match(text):
            self.errors += 1

    def close(self) -> None:
        self._file.close()


def follow(procs: Processes, console: Console, cmd: list[str], env: dict[str, str], *, fatal: dict[str, str],
           droppable: dict[str, str], timeout: float | None = None) -> str | None:
    """Run ``cmd`` (``flwr run ... --stream``) while watching the processes of the launch.

    A process in ``fatal`` (name -> label) that exits ends the run; one in ``droppable`` (a
    SuperNode) is reported and its leftovers stopped, and the run goes on while ``federation.min-devices``
    stay connected. Returns why the run was cut short, or None.
    """
    run = procs.popen("flwr-run", cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    reader = threading.Thread(target=lambda: [console.feed(line) for line in run.stdout], daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    reason, dropped = None, set()
    while run.poll() is None:
        for name, label in fatal.items():
            if (code := procs.procs[name].poll()) is not None:
                reason = f"the {label} (pid {procs.procs[name].pid}) exited with code {code} during the run"
        for name, label in droppable.items():
            if name not in dropped and (code := procs.procs[name].poll()) is not None:
                dropped.add(name)
                console.say(f"[launch] {label} (pid {procs.procs[name].pid}) exited with code {code}; "
                            "stopping what it started; the run goes on while min-devices stay connected")
                procs.stop(name)
        if deadline is not None and time.monotonic() > deadline:
            reason = f"the run did not finish within {timeout:.0f} s"
        if reason:
            procs.stop("flwr-run")
            break
        time.sleep(0.5)
    reader.join(timeout=10)
    return reason


def run_status(env: dict[str, str], connection: str | None = None) -> dict:
    """The newest run's record from ``flwr ls --format json``."""
    cmd = ["flwr", "ls"] + ([connection] if connection else []) + ["--format", "json"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise RuntimeError(f"`flwr ls` printed no JSON: {out.stdout[-500:]} {out.stderr[-500:]}") from None
    if not runs:
        raise RuntimeError("`flwr ls` lists no run")
    # The SuperLink is private to one launch, so the newest run is ours.
    return max(runs, key=lambda r: r.get("pending-at") or "")


def wait_healthy(port: int, proc: subprocess.Popen, *, cafile: Path | None = None, timeout: float = 60.0) -> None:
    """Until the SuperLink's ``/health`` answers (over TLS when ``cafile`` is given)."""
    import urllib.request

    scheme = "https" if cafile else "http"
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"flower-superlink did not become healthy on port {port} within {timeout:.0f} s")


def _finish(console: Console, status: dict | None, reason: str | None, t_start: float, memory: Memory, out_base: Path) -> int:
    """Say how the run ended, keep the full log beside its results, and return the exit code."""
    state = (status or {}).get("status", "unknown")
    code = 0 if state == "finished:completed" and reason is None else 1
    run = (status or {}).get("run-id") or console.run_id or "?"
    console.say(f"[launch] Flower run {run}: {state}" + (f" ({reason})" if reason else "")
                + f"; {time.perf_counter() - t_start:.0f} s, peak memory of all run processes {memory.peak_mb / 1024:.2f} GB")
    folder = console.run_folder
    results = folder / "results.json" if folder else None
    if code == 0 and results is not None and results.exists():
        console.say(f"[launch] results: {results}")
    elif code:
        details = (status or {}).get("status-details")
        console.say("[launch] FAILED" + (f": {details}" if details and details != "N/A" else "")
                    + (f"; what each round did: {results}" if results and results.exists() else "")
                    + (f"; Flower logged {console.errors} error lines" if console.errors else ""))
    keep = (folder if folder and folder.exists() else out_base) / ("flower.log" if folder and folder.exists() else f"flower-{time.strftime('%Y%m%d-%H%M%S')}.log")
    keep.parent.mkdir(parents=True, exist_ok=True)
    console.close()
    shutil.copyfile(console.log, keep)
    print(f"[launch] full Flower log: {keep}", flush=True)
    return code


# ------------------------------------------------------------------------------------------------
# simulation


def launch(devices: int, actors: int, run_config: str, *, app: Path = ROOT, keep_home: bool = False, quiet: bool = False,
           device_policy: str = "", out_base: Path | None = None) -> int:
    """A simulation on a private SuperLink; returns 0 if the run completed, else 1."""
    home = Path(tempfile.mkdtemp(prefix="privtune-flwr-home-"))
    http_port, control_port = free_port(), free_port()
    env = flower_env(home, http_port, control_port)
    # A Ray of this run's own unless RAY_ADDRESS names a cluster: without it, ray.init() would join
    # whatever cluster /tmp/ray/ray_current_cluster last named (a later `ray start`, or one long
    # gone, where it then waits without end).
    env.setdefault("RAY_ADDRESS", "local")
    if device_policy:
        env[POLICY] = device_policy
    (home / "local-superlink").mkdir(parents=True)
    procs = Processes()
    console = Console(home / "flower.log", quiet=quiet)
    memory = Memory(procs)
    t_start = time.perf_counter()
    status, reason = None, None
    try:
        superlink = procs.start("superlink", [
            "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(http_port),
            "--database", str(home / "local-superlink" / "state.db"),
            "--disable-runtime-dependency-installation",
            "--log-file", str(home / "local-superlink" / "superlink.log"),
        ], env)
        console.say(f"[launch] SuperLink pid {superlink.pid} on 127.0.0.1:{http_port} (insecure: a local simulation only); "
                    f"{devices} simulated devices, {actors} at a time")
        memory.start()
        wait_healthy(http_port, superlink)
        cpus = max(1, (os.cpu_count() or 2) // max(1, actors))
        fed = f"num-supernodes={devices} client-resources-num-cpus={cpus} client-resources-num-gpus=0.0"
        cmd = ["flwr", "run", str(app), "--stream", "--federation-config", fed] + (["--run-config", run_config] if run_config else [])
        reason = follow(procs, console, cmd, env, fatal={"superlink": "SuperLink"}, droppable={})
        if superlink.poll() is None:
            status = run_status(env)
    except Exception as exc:  # noqa: BLE001 - report, clean up, and fail the command
        reason = reason or str(exc)
    finally:
        memory.stop()
        procs.stop()
        for log in (home / "local-superlink").glob("superlink.log*"):
            console._file.write(f"--- {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")
        code = _finish(console, status, reason, t_start, memory, out_base or ROOT / "outputs" / "run")
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
    return code


# ------------------------------------------------------------------------------------------------
# deployment


def write_connection(home: Path, name: str, address: str, *, root_certificates: Path | None) -> None:
    """A named SuperLink connection in ``$FLWR_HOME/config.toml`` (``flwr run . <name>``)."""
    tls = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}\n')


def launch_deployment(num_nodes: int, run_config: str, *, app: Path = ROOT, timeout: float = 900.0, device_policy: str = "",
                      certs: Path | None = None, supernode_auth: bool = True, quiet: bool = False,
                      out_base: Path | None = None) -> int:
    """A real deployment on loopback: a SuperLink with TLS (and SuperNode authentication), then
    ``num_nodes`` SuperNodes, then ``flwr run``. ``certs`` holds ``ca.crt``, ``server.crt`` and
    ``server.key`` (made in the temporary FLWR_HOME when not given). Returns 0 if the run completed."""
    from .certs import make_supernode_keys, make_tls

    home = Path(tempfile.mkdtemp(prefix="privtune-flwr-deploy-"))
    logs = home / "logs"
    logs.mkdir()
    port = free_port()
    env = flower_env(home, free_port(), free_port())
    procs = Processes()
    console = Console(home / "flower.log", quiet=quiet)
    memory = Memory(procs)
    t_start = time.perf_counter()
    status, reason = None, None
    try:
        keys = home / "keys"
        keys.mkdir()
        if certs is None:
            tls = make_tls(keys)
        else:
            tls = {"ca": certs / "ca.crt", "certfile": certs / "server.crt", "keyfile": certs / "server.key"}
            missing = [str(p) for p in tls.values() if not p.exists()]
            if missing:
                raise FileNotFoundError(f"--certs {certs}: missing {', '.join(missing)}")
        superlink = procs.start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["certfile"]), "--ssl-keyfile", str(tls["keyfile"]),
            "--database", str(home / "state.db"), "--disable-runtime-dependency-installation",
        ] + (["--enable-supernode-auth"] if supernode_auth else []), env, logs / "superlink.log")
        console.say(f"[launch] SuperLink pid {superlink.pid} on 127.0.0.1:{port} (TLS{', SuperNode authentication' if supernode_auth else ''})")
        memory.start()
        wait_healthy(port, superlink, cafile=tls["ca"])
        write_connection(home, "deploy", f"127.0.0.1:{port}", root_certificates=tls["ca"])
        policy = f" {device_policy}" if device_policy else ""
        names = {}
        for pid in range(num_nodes):
            auth = []
            if supernode_auth:
                private, public = make_supernode_keys(keys, f"supernode-{pid}")
                subprocess.run(["flwr", "supernode", "register", str(public), "deploy"], cwd=ROOT, env=env, check=True,
                               capture_output=True, timeout=120)
                auth = ["--auth-supernode-private-key", str(private)]
            names[f"supernode-{pid}"] = f"SuperNode {pid}"
            procs.start(f"supernode-{pid}", [
                "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(tls["ca"]),
                "--node-config", f"partition-id={pid} num-partitions={num_nodes}{policy}",
                "--host", "127.0.0.1", "--port", str(free_port()),
            ] + auth, env, logs / f"supernode-{pid}.log")
        console.say(f"[launch] {num_nodes} SuperNodes started; their logs: {logs}")
        cmd = ["flwr", "run", str(app), "deploy", "--stream"] + (["--run-config", run_config] if run_config else [])
        reason = follow(procs, console, cmd, env, fatal={"superlink": "SuperLink"}, droppable=names, timeout=timeout)
        if superlink.poll() is None:
            status = run_status(env, "deploy")
    except Exception as exc:  # noqa: BLE001 - report, clean up, and fail the command
        reason = reason or f"{type(exc).__name__}: {exc}"
    finally:
        memory.stop()
        procs.stop()
        for log in sorted(logs.iterdir()):
            console._file.write(f"--- {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")
        code = _finish(console, status, reason, t_start, memory, out_base or ROOT / "outputs" / "run")
        shutil.rmtree(home, ignore_errors=True)
    return code


# ------------------------------------------------------------------------------------------------


# what --help shows: the run-config keys, by group (privtune_flwr.keys), with their defaults and
# ranges (read from RunConfig and its checks, so they cannot drift)
PROG = "python -m privtune_flwr.launch"


def _accepted_ranges() -> dict[str, str]:
    """key -> the accepted range RunConfig.__post_init__ states in its errors (the first check of
    each key; texts that name other keys are shown at those keys' defaults)."""
    tree = ast.parse(Path(_config_module.__file__).read_text())
    post = next(n for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "RunConfig"
                for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "__post_init__")
    found: dict[str, str] = {}
    names = dict(vars(_config_module))
    for node in ast.walk(post):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_require" and len(node.args) == 4):
            continue
        for part in ("bottom", "cloud"):
            try:
                key = eval(compile(ast.Expression(node.args[1]), "<key>", "eval"), names, {"self": RunConfig(), "part": part})
                text = eval(compile(ast.Expression(node.args[3]), "<range>", "eval"), names, {"self": RunConfig(), "part": part})
            except Exception:  # noqa: BLE001 - a check whose text needs more than the defaults: no range shown
                continue
            found.setdefault(key, text)
    return found


def run_config_help(app: Path = ROOT) -> str:
    from .keys import GROUPS

    defaults = app_defaults(app)
    ranges = _accepted_ranges()
    ranges.setdefault("model.name", "minilm, smollm2 (offline), a local folder, or a Hugging Face id (needs network or the HF cache)")
    ranges.setdefault("data.name", ", ".join(offline_datasets()) + "; a local .csv/.json/.jsonl file; a Hugging Face id (network)")
    ranges.setdefault("run.resume-from", "a run folder with checkpoints, or '' (a new run); the launcher's --resume sets it")
    ranges.setdefault("run.output-dir", "a folder; each run gets its own folder in it (the launcher's --out sets it)")
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
    lines = ["run-config keys (--run-config \"group.key=v ...\", TOML values; default, then the accepted range):"]
    for group, leaves in GROUPS.items():
        lines.append(f"  {group}.")
        for name, leaf in leaves.items():
            key, default = f"{group}.{leaf}", getattr(RunConfig, name)
            value = defaults.get(key, default)
            shown = json.dumps(value) if isinstance(value, bool) else repr(value)
            lines.append(f"    {key} = {shown}  ({ranges.get(key) or kinds.get(type(default), 'text')})")
    return "\n".join(lines)


def _plain(text: str) -> str:
    """RST markup as plain text: ``code`` -> `code`."""
    return re.sub(r"``([^`]+)``", r"\1", text)


def make_parser() -> argparse.ArgumentParser:
    description = _plain(__doc__).replace("python -m privtune_flwr.launch [", "make run ARGS=\"...\" or python -m privtune_flwr.launch [", 1)
    epilog = "\n".join([
        run_config_help(),
        "",
        "examples:",
        f"  make run ARGS=\"--devices 3 --run-config 'federation.num-rounds=2'\"",
        f"  {PROG} --devices 3 --run-config \"federation.num-rounds=2 defense.name='dchi' defense.epsilon=32.0\"",
        "  # defense.name='none' releases representations without noise: the devices refuse it unless",
        "  # their policy consents (simulated devices: $PRIVTUNE_DEVICE_POLICY; SuperNodes: --node-config)",
        f"  {PROG} --run-config \"defense.name='none'\" --device-policy \"allowed-defenses='*'\"",
        f"  {PROG} --deployment --devices 3 --run-config \"federation.num-rounds=1 data.max-examples=400\"",
        "",
        "Every problem of a configuration is reported at once, before anything starts (exit code 2).",
    ])
    return argparse.ArgumentParser(prog=PROG, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    parser.add_argument("--devices", type=int, default=10, help="devices: simulated SuperNodes, or real ones with --deployment; default 10")
    parser.add_argument("--actors", type=int, default=2, help="simulation: Ray actors, i.e. devices computed at once; default 2")
    parser.add_argument("--run-config", default="", help='overrides of [tool.flwr.app.config], e.g. "federation.num-rounds=2 defense.name=\'none\'"')
    parser.add_argument("--out", default="outputs/run", help="where each run gets its own folder (and `latest` the newest completed one)")
    parser.add_argument("--device-policy", default="", help='what every device allows, "k=v ..." (e.g. "allow-reproducible-noise=true", '
                        "or \"allowed-defenses='*'\" for defense.name='none'): "
                        f"simulated devices read ${POLICY}, SuperNodes their --node-config; the launcher checks the run against it")
    parser.add_argument("--deployment", action="store_true", help="a real deployment on 127.0.0.1 (TLS, SuperNode authentication) instead of a simulation")
    parser.add_argument("--certs", type=Path, help="deployment: folder with ca.crt, server.crt, server.key (default: made for this launch)")
    parser.add_argument("--app", type=Path, default=ROOT, help="the Flower app folder to run (default: this checkout); "
                        "e.g. a copy whose ClientApp attaches the fault Mod (simulations.compare_runs faults)")
    parser.add_argument("--keep-home", action="store_true", help="simulation: keep the temporary FLWR_HOME after the run")
    parser.add_argument("--resume", type=Path, metavar="RUN_FOLDER",
                        help="continue a stopped run from its last complete checkpoint (the new run gets its own folder)")
    args = parser.parse_args(argv)
    errors = []  # every problem of this command line, reported at once
    if args.devices < 1:
        errors.append(f"--devices={args.devices} is outside the accepted range: >= 1")
    if args.actors < 1:
        errors.append(f"--actors={args.actors} is outside the accepted range: >= 1")
    out = Path(args.out).resolve()
    overrides: dict = {}
    try:
        overrides = parse_pairs(args.run_config, "--run-config")
    except ValueError as exc:
        errors.append(str(exc))
    try:
        parse_pairs(args.device_policy, "--device-policy")
    except ValueError as exc:
        errors.append(str(exc))
    app = args.app.expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        errors.append(f"--app {app}: it holds no pyproject.toml (a Flower app folder has one)")
        app_config = app_defaults(ROOT)
    else:
        app_config = app_defaults(app)
    defaults, _ = collect_errors(app_config)
    devices = max(1, args.devices)
    overrides.setdefault("federation.devices-per-round", min(devices, defaults.devices_per_round))
    # A run goes on while federation.min-devices stay connected: below the device count, so that one
    # device dropping out does not stall it.
    overrides.setdefault("federation.min-devices", min(defaults.min_devices, max(1, devices - 1)))
    overrides.setdefault("run.output-dir", str(out))
    if args.resume is not None:
        folder = args.resume.expanduser().resolve()
        if not sorted((folder / "checkpoints").glob("round-[0-9][0-9][0-9].pt")):
            errors.append(f"--resume {folder}: it holds no checkpoints/round-NNN.pt to resume from")
        overrides["run.resume-from"] = str(folder)
    # what the devices will allow: simulated ones read $PRIVTUNE_DEVICE_POLICY (the launcher sets
    # it to --device-policy when given), SuperNodes that variable and then their --node-config
    inherited = os.environ.get(POLICY, "")
    policy = " ".join(filter(None, [inherited, args.device_policy])) if args.deployment else (args.device_policy or inherited)
    try:
        parse_pairs(policy, "--device-policy")
    except ValueError:
        policy = None  # reported above
    cfg, found = preflight({**app_config, **overrides}, device_policy=policy, offline=True, torch_free=True)
    errors += found
    for key, value in (("federation.min-devices", cfg.min_devices), ("federation.devices-per-round", cfg.devices_per_round)):
        if value > args.devices >= 1:
            errors.append(f"{key}={value} is outside the accepted range for --devices {args.devices}: 1..{args.devices}")
    if not errors:  # the launcher's devices, simulated or SuperNodes, read the bundled corpora
        errors += share_errors(cfg, args.devices)
    if not args.deployment:
        errors += ray_address_errors()
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    if args.deployment:
        return launch_deployment(args.devices, run_config, app=app, device_policy=args.device_policy, certs=args.certs, out_base=out)
    return launch(args.devices, args.actors, run_config, app=app, keep_home=args.keep_home, device_policy=args.device_policy,
                  out_base=out)


if __name__ == "__main__":
    # Only as a command: a process that imports the launcher (a test) keeps its own parentage.
    _become_subreaper()
    # `kill PID` (SIGTERM) unwinds like Ctrl-C, so the clean-up in `finally` stops what was started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
