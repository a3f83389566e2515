"""The same simulation on an existing Ray cluster: two raylets on loopback, the launcher pointed at
them through ``RAY_ADDRESS`` (Flower's backend calls ``ray.init()`` only when Ray is not yet
initialised, and ``ray.init()`` reads ``RAY_ADDRESS``). Ray's own ``ray.cluster_utils.Cluster``
was tried first: a second process could not connect to it (``ray.init`` waited on its GCS for
over 100 s), while a cluster made with ``ray start`` works as Flower's guide describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ("federation.num-rounds=1 data.max-examples=200 train.batch-size=2 train.batches-per-round=1 model.max-length=24 federation.eval-examples=2 "
          "defense.audit-tokens=0 defense.name='dchi' defense.epsilon=50.0 model.split-layer=1 federation.devices-per-round=4 federation.min-devices=4")

ACTORS = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([[a["ActorClassName"], a["Address"]["NodeID"]] for a in state.actors().values()]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(marker: str) -> list[int]:
    """The processes of the cluster whose session lives under ``marker`` (its temp dir), and all
    their descendants (Ray's agents and workers): only those, never another Ray on this machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(entry)] = (ppid, args)
    mine = {pid for pid, (_, args) in table.items() if marker in args}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in mine} - mine
        mine |= more
        grew = bool(more)
    return sorted(mine)


def _stop(marker: str) -> None:
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


@pytest.mark.e2e
def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(tmp_path):
    """Flower's multi-node recipe: ``ray start --head``, ``ray start --address`` for a second
    raylet, then the launcher with ``RAY_ADDRESS``; each ClientApp actor takes one CPU, so with
    one CPU per raylet the devices run on both."""
    import tempfile

    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp,
                        *common], check=True, capture_output=True, timeout=180)
        subprocess.run([ray, "start", "--address", address, *common], check=True, capture_output=True, timeout=180)
        env = dict(os.environ, RAY_ADDRESS=address)
        out = tmp_path / "run"
        proc = subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--devices", "4", "--actors", "2", "--out", str(out),
                               "--run-config", CONFIG], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results = json.loads((out / "latest" / "results.json").read_text())
        assert results["status"] == "completed" and results["rounds"][0]["valid-replies"] == 4
        listed = subprocess.run([sys.executable, "-c", ACTORS, address], capture_output=True, text=True, timeout=180)
        actors = json.loads(listed.stdout.strip().splitlines()[-1])
        nodes = {node for name, node in actors if name == "ClientAppActor"}
        assert len(nodes) == 2, actors  # the devices ran on both raylets
    finally:
        _stop(temp)
    assert _cluster_processes(temp) == []


@pytest.mark.e2e
def test_an_unreachable_ray_address_is_refused_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-m", "privtune_flwr.launch", "--devices", "2", "--out", str(tmp_path / "run"),
                           "--run-config", "federation.num-rounds=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"RAY_ADDRESS=127.0.0.1:{port}" in proc.stderr and "no Ray cluster answers" in proc.stderr
