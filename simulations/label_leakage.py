"""How much the u-shaped gradients tell the cloud about the device's labels, and what protecting them costs.

    python -m simulations.label_leakage --out DIR [--steps 100] [--defenses none] \\
        [--protections none,max-norm,marvell,randomised-response] [--label-epsilon 1] [--label-noise 4] \\
        [--seeds 0] [--eval-examples 400] [--generation-steps 0]

A frontier: ``--label-noise`` and ``--label-epsilon`` take comma-separated lists (one run per value
of the method that uses it) and ``--seeds`` a list; the table then gives, per point, the mean over
seeds, and ``DIR/frontier.png`` plots each method's strongest attack AUC against test accuracy.

Rotten Tomatoes, MiniLM split after block 1, u-shaped: one device trains its head while the cloud
trains the middle, in process, on batches released through each defence (seeded noise, stated),
with each label protection of :mod:`privtune_flwr.label_protection` on the device. Every gradient
the device returns is kept and attacked (``privtune_flwr.attacks.gradient``):

* the direction attack with one known label per step, and its sign-free AUC;
* the norm attack (sign-free AUC);
* a learned attack: logistic regression on gradient features, trained on the attacker's own
  auxiliary labelled data (IMDB sentences) sent through the same protocol at every step: the same
  middle outputs' weights, a device head from the same public initialisation, the same protection.

Utility: the trained middle + the device's head on ``--eval-examples`` test sentences (accuracy).
Generation (``--generation-steps N``): SmolLM2 on Rotten Tomatoes continuations, the direction
attack's top-1 next-token recovery from the returned gradients against the tied ``lm_head``.
Prints a table and writes ``DIR/label_leakage.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def _run(args, name: str, protection: str, ds, aux):
    import torch

    from privtune_flwr.attacks.gradient import label_inference, learned_attack, norm_attack
    from privtune_flwr.cloud import MiddleSide
    from privtune_flwr.device import DeviceHead, DeviceSide, device_defense
    from privtune_flwr.label_protection import LabelProtection
    from privtune_flwr.mechanism.noise_key import NoiseKey
    from privtune_flwr.models import load_split

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    split = load_split("minilm", 1, num_labels=2, lora_rank=8, protocol="u-shaped", seed=args.seed)
    defense = device_defense(name, split, epsilon=args.epsilon, texts=ds.train["text"], labels=ds.train["label"], seed=0)
    device = DeviceSide(split, defense, max_length=64, audit_tokens=0)
    cloud, head = MiddleSide(split, learning_rate=1e-3), DeviceHead(split, learning_rate=1e-3)
    key = NoiseKey.from_seed(f"label-leakage/{args.seed}")  # research: seeded, stated
    head.protection = LabelProtection(protection, epsilon=args.label_epsilon, noise=args.label_noise, key=key)
    # the attacker's device: its own head from the same public initialisation, the same protection
    attacker = DeviceHead(split, learning_rate=1e-3)
    attacker_state = {"weights": {k: v.clone() for k, v in head.initial.items()}, "optimizer": None}
    victim_state = {"weights": {k: v.clone() for k, v in head.initial.items()}, "optimizer": None}
    attacker.protection = LabelProtection(protection, epsilon=args.label_epsilon, noise=args.label_noise,
                                          key=NoiseKey.from_seed(f"attacker/{args.seed}"))
    order = list(range(len(ds.train)))
    random.Random(args.seed).shuffle(order)
    aux_order = list(range(len(aux)))
    random.Random(args.seed + 1).shuffle(aux_order)
    steps, aux_steps, losses = [], [], []
    for step in range(args.steps):
        batch = ds.train.select(order[step * args.batch:(step + 1) * args.batch])
        encoded = device.encode(batch["text"])
        rel = device.release_ids(encoded)
        labels = torch.tensor(list(batch["label"]))
        out = cloud.forward(str(step), rel.hidden, rel.attention_mask)
        head.load(victim_state)
        grad, loss = head.step(out, rel.attention_mask, labels, token_ids=encoded)
        victim_state = head.dump()
        cloud.backward(str(step), grad)
        # the attacker's own labelled batch through the same middle (not trained on)
        abatch = aux.select(aux_order[(step * args.batch) % len(aux):][: args.batch] or aux_order[: args.batch])
        aenc = device.encode(abatch["text"])
        arel = device.release_ids(aenc)
        aout = cloud.forward(f"aux{step}", arel.hidden, arel.attention_mask, train=False)
        head.load(attacker_state)  # the shared module; the attacker's weights are its own
        agrad, _ = head.step(aout, arel.attention_mask, torch.tensor(list(abatch["label"])), token_ids=aenc)
        attacker_state = head.dump()
        cloud.step()
        steps.append((grad, labels))
        aux_steps.append((agrad, torch.tensor(list(abatch["label"]))))
        losses.append(loss)
    head.load(victim_state)
    # utility: the trained middle and the victim's head on test sentences
    test = ds.test.select(range(min(args.eval_examples, len(ds.test))))
    correct = 0
    for i in range(0, len(test), 64):
        rows = test.select(range(i, min(i + 64, len(test))))
        rel = device.release(rows["text"])
        out = cloud.forward("eval", rel.hidden, rel.attention_mask, train=False)
        metrics = head.evaluate(out, rel.attention_mask, torch.tensor(list(rows["label"])))
        correct += metrics["accuracy"] * len(rows)
    direction = label_inference(steps)
    # pooled AUC of the direction attack with each step's sign resolved by its known example, and
    # the sign-free per-step AUC on labels shuffled within each step (its chance level, which is
    # above 0.5 for max(AUC, 1 - AUC) over 16 examples)
    from privtune_flwr.attacks.gradient import auc, projection_scores

    signed, truth = [], []
    for g, y in steps:
        sc = projection_scores(g)
        sign = 1.0 if (sc[0] >= 0) == bool(y[0]) else -1.0
        signed.append(sign * sc[1:])
        truth.append(y[1:])
    gen = torch.Generator().manual_seed(args.seed)
    chance = label_inference([(g, y[torch.randperm(len(y), generator=gen)]) for g, y in steps])
    norm = norm_attack(steps)
    learned = learned_attack(aux_steps, steps)
    half = args.steps // 2
    row = {"defense": name, "protection": protection, "epsilon": None if name == "none" else args.epsilon,
           "label-epsilon": args.label_epsilon if protection == "randomised-response" else None,
           "label-noise": args.label_noise if protection == "marvell" else None,
           "steps": args.steps, "batch": args.batch, "seed": args.seed,
           "direction-accuracy": direction["accuracy"], "direction-auc": direction["auc"], "majority": direction["majority"],
           "direction-auc-second-half": label_inference(steps[half:])["auc"],
           "direction-auc-known-sign": auc(torch.cat(signed), torch.cat(truth)),
           "direction-auc-shuffled-labels": chance["auc"], "direction-accuracy-shuffled-labels": chance["accuracy"],
           "norm-auc": norm["auc"], "norm-accuracy": norm["accuracy"],
           "learned-auc": learned["auc"], "learned-accuracy": learned["accuracy"],
           "test-accuracy": correct / max(len(test), 1), "test-examples": len(test),
           "final-loss": sum(losses[-10:]) / min(10, len(losses)), "seconds": time.perf_counter() - t0}
    return row


def _generation(args) -> dict:
    """SmolLM2 u-shaped on RT continuations: what the returned gradients say about next tokens."""
    import torch

    from privtune_flwr import data
    from privtune_flwr.attacks.gradient import next_token_recovery
    from privtune_flwr.cloud import MiddleSide
    from privtune_flwr.device import DeviceHead, DeviceSide, device_defense
    from privtune_flwr.label_protection import LabelProtection
    from privtune_flwr.mechanism.noise_key import NoiseKey
    from privtune_flwr.models import load_split

    ds = data.load_dataset("rotten_tomatoes_continuation", seed=0, max_examples=400)
    seqs = [p + c for p, c in (data.generation_pair("rotten_tomatoes_continuation", t, g)
                               for t, g in zip(ds.train["text"], ds.train["target"]))]
    rows = []
    for protection in ("none", "max-norm"):
        torch.manual_seed(args.seed)
        split = load_split("smollm2", 2, task="generation", lora_rank=4, protocol="u-shaped", seed=args.seed)
        device = DeviceSide(split, device_defense("none", split, epsilon=None, texts=seqs, labels=None, task="generation"),
                            max_length=32, audit_tokens=0)
        cloud, head = MiddleSide(split, learning_rate=1e-3), DeviceHead(split, learning_rate=1e-3)
        head.protection = LabelProtection(protection, key=NoiseKey.from_seed("gen"))
        # the tied lm_head's weight [V, d] (public: the embedding table), as the cloud knows it
        lm = [m for n, m in split.head.out.named_parameters() if m.dim() == 2 and m.shape[0] > m.shape[1]][0].detach()
        top1 = top10 = n = 0
        for step in range(args.generation_steps):
            enc = device.encode(seqs[step * 4:(step + 1) * 4])
            rel = device.release_ids(enc)
            out = cloud.forward(str(step), rel.hidden, rel.attention_mask)
            grad, _ = head.step(out, rel.attention_mask, rel.input_ids)
            cloud.backward(str(step), grad)
            cloud.step()
            r = next_token_recovery(grad, rel.attention_mask, rel.input_ids, lm)
            top1 += r["top1"] * r["positions"]
            top10 += r["top10"] * r["positions"]
            n += r["positions"]
        rows.append({"task": "generation", "protection": protection, "steps": args.generation_steps,
                     "next-token-top1": top1 / max(n, 1), "next-token-top10": top10 / max(n, 1), "positions": n})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _floats(text) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


ATTACKS = ("direction-auc-known-sign", "norm-auc", "learned-auc")


def _points(rows: list[dict]) -> list[dict]:
    """Rows grouped by (defence, protection, its parameter): means and sds over seeds, and the
    strongest attack (the largest AUC of the three, per seed, then averaged)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["defense"], r["protection"], r["label-noise"], r["label-epsilon"]), []).append(r)
    out = []
    for (defense, protection, noise, eps), rs in groups.items():
        point = {"defense": defense, "protection": protection, "label-noise": noise, "label-epsilon": eps, "seeds": len(rs)}
        for key in ("direction-accuracy", "direction-auc-shuffled-labels", *ATTACKS, "learned-accuracy", "test-accuracy"):
            values = [r[key] for r in rs]
            point[key] = statistics.mean(values)
            point[key + "-sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        point["strongest-auc"] = statistics.mean(max(r[k] for k in ATTACKS) for r in rs)
        out.append(point)
    return out


def _table(rows: list[dict]) -> None:
    print(f"{'defense':<8} {'protection':<20} {'param':>6} {'seeds':>5} {'dir-acc':>7} {'dir-AUC-known':>13} "
          f"{'norm-AUC':>8} {'learn-AUC':>9} {'strongest':>9} {'test-acc':>12}")
    for r in rows:
        if r.get("task") == "generation":
            print(f"generation {r['protection']:<18} next-token top-1 {r['next-token-top1']:.3f} top-10 "
                  f"{r['next-token-top10']:.3f} over {r['positions']} positions")
    for p in _points([r for r in rows if r.get("task") != "generation"]):
        param = p["label-noise"] if p["label-noise"] is not None else p["label-epsilon"]
        print(f"{p['defense']:<8} {p['protection']:<20} {'-' if param is None else f'{param:g}':>6} {p['seeds']:>5} "
              f"{p['direction-accuracy']:>7.3f} {p['direction-auc-known-sign']:>13.3f} {p['norm-auc']:>8.3f} "
              f"{p['learned-auc']:>9.3f} {p['strongest-auc']:>9.3f} "
              f"{p['test-accuracy']:>6.3f}±{p['test-accuracy-sd']:.3f}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_method: dict[str, list[dict]] = {}
    for p in _points(rows):
        by_method.setdefault(f"{p['protection']} ({p['defense']})", []).append(p)
    for label, points in by_method.items():
        points.sort(key=lambda p: p["test-accuracy"])
        ax.plot([p["test-accuracy"] for p in points], [p["strongest-auc"] for p in points], marker="o", label=label)
        for p in points:
            param = p["label-noise"] if p["label-noise"] is not None else p["label-epsilon"]
            if param is not None:
                ax.annotate(f"{param:g}", (p["test-accuracy"], p["strongest-auc"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.axhline(0.55, color="grey", linestyle=":", linewidth=1, label="chance + 0.05")
    ax.set_xlabel("test accuracy (u-shaped, Rotten Tomatoes)")
    ax.set_ylabel("strongest label attack's AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--defenses", default="none")
    parser.add_argument("--protections", default="none,max-norm,marvell,randomised-response")
    parser.add_argument("--label-epsilon", default="1", help="randomised response's epsilon; a list gives a frontier")
    parser.add_argument("--label-noise", default="4", help="marvell's noise; a list gives a frontier")
    parser.add_argument("--seeds", default="0", help="comma-separated; each point is run once per seed")
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--generation-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from privtune_flwr import data

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ds = data.load_dataset("rotten_tomatoes", seed=0)
    aux = data.load_dataset("imdb", seed=0, max_examples=4000).train  # the attacker's own labelled text
    rows = []
    noises, epsilons, seeds = _floats(args.label_noise), _floats(args.label_epsilon), [int(v) for v in _floats(args.seeds)]
    for name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
        for protection in [p.strip() for p in args.protections.split(",") if p.strip()]:
            values = {"marvell": [("label_noise", v) for v in noises],
                      "randomised-response": [("label_epsilon", v) for v in epsilons]}.get(protection, [(None, None)])
            for field, value in values:
                for seed in seeds:
                    point = argparse.Namespace(**{**vars(args), "seed": seed, "label_noise": noises[0],
                                                  "label_epsilon": epsilons[0], **({field: value} if field else {})})
                    row = _run(point, name, protection, ds, aux)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    (args.out / "label_leakage.json").write_text(json.dumps(rows, indent=2))
    if args.generation_steps:
        args.seed = seeds[0]
        rows += _generation(args)
        (args.out / "label_leakage.json").write_text(json.dumps(rows, indent=2))
    _table(rows)
    if len(rows) > 1:
        _plot([r for r in rows if r.get("task") != "generation"], args.out / "frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
