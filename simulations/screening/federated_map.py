"""The federation's label map, its fit phase run in one process with the product's own functions,
then the map's utility and the adaptive inversion attacks on releases made with it.

    python -m simulations.screening federated-map VARIANT[,VARIANT...] [DEVICES] [PARTITIONER] [STEPS] [FIELD=VALUE,...]

after ``python -m simulations.screening cache 3`` (the split-3 bottom outputs of Rotten Tomatoes).
The 6,910 training sentences are shared out by the app's partitioner (``iid`` or ``dirichlet``,
alpha 0.5) over DEVICES devices (default 10). Each device computes its clipped statistics with
noise at the default floor (``federated_map.device_contribution``: OS entropy, fit-epsilon 64),
the cloud sums them, then runs the reader rounds (``federated_reader.private_steps`` on each
device, ``mean_change`` on the cloud; or ``private_gradient`` and ``summed_gradient``) from the run
config's defaults; device 0 derives the map
(``derive_subspace``) and audits it (``audit_map``). Variants:

- ``closed-form``: ``subspace-fit-rounds = 0`` (the statistics alone);
- ``reader-cloud``: the defaults (``fit-optimizer = "cloud"``: one noisy gradient sum per device a
  round, the cloud's Adam on their sum: ``summed_gradient``, ``CloudAdam``);
- ``reader-noiseless``: the same rounds without noise (``fit-epsilon = inf``): what the noise costs;
- ``reader``: ``fit-optimizer = "device"`` (each device's own ``fit-steps`` Adam steps, the mean of
  the changes), at its former defaults of 8 rounds and ``fit-lr = 0.01``;
- ``one-map``: ``fit_subspace`` on all the training sentences at once (the sweep's map).

Then: the real top (LoRA above split 3) trained STEPS steps (default 800) on the released
training sentences, scored on the released test sentences every 200; EIA-1 (KNN) and EIA-2 (MLP),
adaptive (the aux sentences released the same way), on the victim sentences. One JSON line per
variant on stdout and appended to ``federated_map.jsonl`` beside the cache (``outputs/screening``).
The last argument sets ``RunConfig`` fields of the reader variants (for example
``subspace_fit_rounds=16,subspace_fit_lr=0.03``).
"""

from __future__ import annotations

import json
import sys
import time

import datasets
import torch

from privtune_flwr import data
from privtune_flwr.config import RunConfig
from privtune_flwr.defenses import LabelSubspaceDefense
from privtune_flwr.device_policy import DevicePolicy
from privtune_flwr.federated_map import (aggregate, audit_map, derive_subspace, device_contribution,
                                         released_coordinates)
from privtune_flwr.federated_reader import (CloudAdam, ReaderPlan, frame_of, initial_weights, mean_change,
                                            private_gradient, private_steps, reader_shapes, split_budget, step_bound,
                                            summed_gradient)
from privtune_flwr.mechanism.subspace import _pad, fit_subspace
from simulations.screening.screen_lib import cache_path, released, top_utility

VARIANTS = ("closed-form", "reader", "reader-noiseless", "reader-cloud", "one-map")


def shares(labels, devices: int, partitioner: str) -> list[list[int]]:
    table = datasets.Dataset.from_dict({"label": [int(y) for y in labels], "row": list(range(len(labels)))})
    return [data.partition(table, devices, p, partitioner=partitioner, alpha=0.5, seed=0)["row"] for p in range(devices)]


def federated_map(split, train, parts, cfg: RunConfig, policy: DevicePolicy):
    rows, ids, labels = train["rows"], train["ids"], [int(y) for y in train["labels"]]
    special = split.special_ids
    start = time.perf_counter()
    contributions = []
    for p, idx in enumerate(parts):
        stats, _ = device_contribution([rows[i] for i in idx], [ids[i] for i in idx], [labels[i] for i in idx], cfg=cfg,
                                       policy=policy, special_ids=special)
        contributions.append((f"device {p}", stats.to_numpy()))
    total, accepted, rejected = aggregate(contributions, classes=2, hidden=split.hidden_size, specials=len(special))
    info = {"contributions": len(accepted), "rejected": len(rejected), "statistics_seconds": time.perf_counter() - start}
    weights = None
    plan = ReaderPlan.from_config(cfg)
    if plan.rounds:
        start = time.perf_counter()
        multiplier = 0.0 if policy.fit_epsilon == float("inf") else split_budget(policy.fit_epsilon, policy.fit_delta,
                                                                                  plan)[1]
        w = {k: torch.from_numpy(v) for k, v in initial_weights(plan, split.hidden_size, cfg.seed).items()}
        center, scale = frame_of(total)
        shapes, bound = reader_shapes(plan, split.hidden_size), step_bound(plan)
        cloud = CloudAdam(w, plan.lr) if plan.optimizer == "cloud" else None
        step = private_steps if cloud is None else private_gradient
        for r in range(plan.rounds):
            changes = []
            for p, idx in enumerate(parts):
                change, _ = step(w, [rows[i] for i in idx], [ids[i] for i in idx], [labels[i] for i in idx],
                                 center=center, scale=scale, special_ids=special, plan=plan, multiplier=multiplier)
                changes.append((f"device {p}", {k: v.numpy() for k, v in change.items()}))
            if cloud is None:
                mean, _, _ = mean_change(changes, shapes, bound)
                w = {k: w[k] + mean[k] for k in w}
            else:
                summed, _, _, scaled = summed_gradient(changes, shapes)
                w = cloud.step(w, summed)
                info["scaled_down"] = info.get("scaled_down", 0) + len(scaled)
            print(f"  reader round {r + 1}/{plan.rounds}: {time.perf_counter() - start:.0f} s", flush=True)
        weights = w["basis-weights"]
        info.update(reader_seconds=time.perf_counter() - start, noise_multiplier=multiplier)
    return derive_subspace(total, cfg.subspace_rank, special_ids=special, weights=weights), info


def release_all(defense, rows, ids):
    out = []
    for s in range(0, len(rows), 128):
        b = list(range(s, min(s + 128, len(rows))))
        hidden, tokens, mask = _pad([rows[i] for i in b], [ids[i] for i in b])
        with torch.no_grad():
            rel = defense(hidden, tokens, mask)
        out += [rel[j, :len(rows[i])].clone() for j, i in enumerate(b)]
    return out


def main(argv) -> list[dict]:
    """One JSON line per variant; returns the rows."""
    from privtune_flwr.attacks import run_attack
    from privtune_flwr.models import load_split

    variants = argv[0].split(",")
    devices = int(argv[1]) if len(argv) > 1 else 10
    partitioner = argv[2] if len(argv) > 2 else "iid"
    steps = int(argv[3]) if len(argv) > 3 else 800
    fields = {}
    for pair in (argv[4].split(",") if len(argv) > 4 and argv[4] else []):
        name, value = pair.split("=")
        fields[name] = type(getattr(RunConfig(), name))(value)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"variant {bad[0]!r} is not accepted; accepted: {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    out_path = cache_path(3).parent / "federated_map.jsonl"
    rows_out = []
    cache = torch.load(cache_path(3))
    split = load_split("minilm", 3, "classification", 2, seed=0)
    train, test, victim, aux = cache["train"], cache["test"], cache["victim"], cache["aux"]
    parts = shares(train["labels"].tolist(), devices, partitioner)
    for variant in variants:
        t0 = time.time()
        cfg = RunConfig(subspace_fit_scope="federation", subspace_rank=2, max_length=64,
                        **{**({"subspace_fit_optimizer": "device", "subspace_fit_rounds": 8, "subspace_fit_lr": 0.01}
                              if variant == "reader" else {}), **fields,
                           **({"subspace_fit_rounds": 0} if variant == "closed-form" else {})})
        policy = DevicePolicy(fit_epsilon=float("inf")) if variant == "reader-noiseless" else DevicePolicy()
        if variant == "one-map":
            subspace, info = fit_subspace(train["rows"], train["ids"], train["labels"], rank=2,
                                          special_ids=split.special_ids), {}
        else:
            subspace, info = federated_map(split, train, parts, cfg, policy)
        fit_seconds = time.time() - t0
        defense = LabelSubspaceDefense(split, 64.0, subspace=subspace, subspace_rank=2)
        mine = parts[0]
        audit = audit_map(released_coordinates(defense, [train["rows"][i] for i in mine], [train["ids"][i] for i in mine]),
                          [train["ids"][i] for i in mine], [int(train["labels"][i]) for i in mine],
                          special_ids=split.special_ids)
        history = top_utility(split, release_all(defense, train["rows"], train["ids"]), train["labels"],
                              release_all(defense, test["rows"], test["ids"]), test["labels"], steps=steps,
                              eval_every=min(200, steps))
        aux_r = released(release_all(defense, aux["rows"], aux["ids"]), aux["ids"])
        vic_r = released(release_all(defense, victim["rows"], victim["ids"]), victim["ids"])
        eia1 = run_attack("eia-knn", split, aux_r, vic_r)["asr"]
        eia2 = run_attack("eia-mlp", split, aux_r, vic_r, hidden=1024, epochs=3, vocab_cap=4000)["asr"]
        row = {"variant": variant, "devices": devices, "partitioner": partitioner, "steps": steps, "fields": fields, **info,
               "fit_seconds": round(fit_seconds, 1), "top": history, "best": max(a for _, a in history),
               "last3": sum(a for _, a in history[-3:]) / len(history[-3:]), "audit_inversion": audit.inversion,
               "audit_label": audit.label, "eia1_adaptive": eia1, "eia2_adaptive": eia2,
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        with out_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows_out.append(row)
    return rows_out


if __name__ == "__main__":
    main(sys.argv[1:])
