"""Flower runs side by side, one launcher call each, in one command: protocols, faults, defences.

    python -m simulations.compare_runs protocols --out DIR   # vanilla vs u-shaped, same job
    python -m simulations.compare_runs faults --out DIR      # clean vs 20% faulty devices
    python -m simulations.compare_runs generation --out DIR  # SmolLM2 headlines: none, dchi, privtune

Every run is ``python -m privtune_flwr.launch`` (a private SuperLink, ``flwr run``, the simulation
engine); the table compares what each run's ``results.json`` recorded. Ratios come from runs made
one after the other in the same command on the same machine. Writes ``DIR/<name>.json``.

* ``protocols``: samples/s (training examples / training seconds, over all rounds), messages per
  training step and bytes per step in each direction, and final accuracy, for ``protocol =
  vanilla`` and ``u-shaped`` on the same job and seed.
* ``faults``: the default job clean and with 20% faulty devices (two of ten raise or send NaN every
  round; the device-side Mod of ``simulations.faults``, attached through a copy of the app whose
  ClientApp is ``simulations.faults:app``): rejected replies by kind and the final accuracy, with
  one standard error.
* ``generation``: BBC News headline generation with SmolLM2 (u-shaped): perplexity and ROUGE-L of
  generated headlines before and after fine-tuning, for ``none``, ``dchi`` and ``privtune``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETS = {
    "protocols": {
        "runs": {"vanilla": "federation.protocol='vanilla'", "u-shaped": "federation.protocol='u-shaped'"},
        "common": "defense.name='none' defense.audit-tokens=0",
        "policy": "allowed-defenses='*'",
        "devices": 10,
    },
    "faults": {
        "runs": {"clean": "", "20% faulty": ""},
        "faults": {"20% faulty": "fraction=0.2 kinds='raise,nan'"},  # PRIVTUNE_FAULTS of the devices
        "common": "defense.audit-tokens=0",
        "policy": "",
        "devices": 10,
    },
    "generation": {
        "runs": {"none": "defense.name='none'", "dchi": "defense.name='dchi'", "privtune": "defense.name='privtune'"},
        "common": ("model.name='smollm2' model.split-layer=2 data.task='generation' federation.protocol='u-shaped' data.name='bbc_headlines' "
                   "model.max-length=128 train.batch-size=4 train.batches-per-round=4 federation.num-rounds=3 federation.eval-examples=8 defense.audit-tokens=0 "
                   "generation.samples=4 generation.max-new-tokens=16 model.lora-rank=8 train.learning-rate=0.0005"),
        "policy": "allowed-defenses='*'",
        "devices": 4,
    },
}


def faulty_app_folder(out: Path) -> Path:
    """A copy of the app whose ClientApp is ``simulations.faults:app`` (the same handlers behind
    the fault Mod); the code itself is imported from this checkout."""
    folder = out / "faulty-app"
    folder.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "pyproject.toml").read_text()
    product = 'clientapp = "privtune_flwr.client_app:app"'
    if product not in text:
        raise RuntimeError(f"pyproject.toml no longer names {product!r}; update faulty_app_folder")
    (folder / "pyproject.toml").write_text(text.replace(product, 'clientapp = "simulations.faults:app"'))
    return folder


def run_one(name: str, config: str, policy: str, devices: int, out: Path, extra: str, faults: str = "") -> dict:
    folder = out / name.replace(" ", "-").replace("%", "pct")
    cmd = [sys.executable, "-m", "privtune_flwr.launch", "--devices", str(devices), "--out", str(folder),
           "--run-config", f"{config} {extra}".strip()]
    if policy:
        cmd += ["--device-policy", policy]
    env = dict(os.environ)
    if faults:
        cmd += ["--app", str(faulty_app_folder(out))]
        env["PRIVTUNE_FAULTS"] = faults
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    results_file = folder / "latest" / "results.json"
    if proc.returncode != 0 or not results_file.exists():
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        return {"name": name, "failed": True, "wall-seconds": wall}
    results = json.loads(results_file.read_text())
    rounds = results["rounds"]
    train_seconds = sum(r.get("cloud-seconds", 0.0) for r in rounds)
    examples = sum(r.get("num-examples", 0.0) for r in rounds)
    steps = sum(r.get("steps", 0.0) for r in rounds)
    final = results["final"]
    causes: dict[str, int] = {}
    for entry in results.get("rejected-replies", []):
        cause = entry["cause"].split(":")[-1].strip() if "injected" not in entry["cause"] else "injected crash"
        causes[cause] = causes.get(cause, 0) + 1
    accuracy = final.get("test-accuracy")
    n = rounds[-1].get("test-num-examples") if rounds else None
    return {
        "name": name, "config": config, "wall-seconds": wall, "round-seconds": [r.get("round-seconds") for r in rounds],
        "train-examples": examples, "steps": steps, "samples-per-second": examples / train_seconds if train_seconds else None,
        "round-samples-per-second": examples / sum(r.get("round-seconds", 0.0) for r in rounds),
        "messages-per-step": rounds[-1].get("messages-per-step"),
        "bytes-up-per-step": sum(r.get("bytes-received", 0.0) for r in rounds) / steps if steps else None,
        "bytes-down-per-step": sum(r.get("bytes-sent", 0.0) for r in rounds) / steps if steps else None,
        "test-accuracy": accuracy, "test-examples": n,
        "standard-error": math.sqrt(accuracy * (1 - accuracy) / n) if accuracy is not None and n else None,
        "test-perplexity": final.get("test-perplexity"), "generation": results.get("generation"),
        "rejected-by-cause": causes, "status": results["status"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--run-config", default="", help="extra overrides for every run (e.g. smaller sizes)")
    args = parser.parse_args(argv)
    spec = SETS[args.set]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, config in spec["runs"].items():
        print(f"[compare] {args.set}: {name} ...", flush=True)
        rows.append(run_one(name, f"{spec['common']} {config}".strip(), spec["policy"], spec["devices"], args.out, args.run_config,
                            spec.get("faults", {}).get(name, "")))
        print(f"[compare] {json.dumps(rows[-1])}", flush=True)
    (args.out / f"{args.set}.json").write_text(json.dumps(rows, indent=2))
    base = rows[0]
    print(f"{'run':<12} {'samples/s':>10} {'vs first':>9} {'msgs/step':>10} {'up B/step':>12} {'down B/step':>12} "
          f"{'accuracy':>9} {'± se':>7} {'ppl':>8}  rejected")
    for r in rows:
        if r.get("failed"):
            print(f"{r['name']:<12} FAILED")
            continue
        ratio = (r["samples-per-second"] / base["samples-per-second"]) if base.get("samples-per-second") and r["samples-per-second"] else None
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['name']:<12} {fmt(r['samples-per-second'], '10.1f')} {fmt(ratio, '9.3f')} {fmt(r['messages-per-step'], '10.1f')} "
              f"{fmt(r['bytes-up-per-step'], '12.0f')} {fmt(r['bytes-down-per-step'], '12.0f')} {fmt(r['test-accuracy'], '9.4f')} "
              f"{fmt(r['standard-error'], '7.4f')} {fmt(r['test-perplexity'], '8.2f')}  {r['rejected-by-cause']}")
    return 0 if not any(r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
