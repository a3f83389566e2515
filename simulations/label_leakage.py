"""How much the u-shaped gradients tell the cloud about the device's labels, and what protecting them costs.

    python -m simulations.label_leakage --out DIR [--steps 100] [--defenses none] \\
        [--protections none,max-norm,marvell,randomised-response] [--label-epsilon 1] [--label-noise 4] \\
        [--eval-examples 400] [--generation-steps 0]

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--defenses", default="none")
    parser.add_argument("--protections", default="none,max-norm,marvell,randomised-response")
    parser.add_argument("--label-epsilon", type=float, default=1.0)
    parser.add_argument("--label-noise", type=float, default=4.0)
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--generation-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from privtune_flwr import data

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ds = data.load_dataset("rotten_tomatoes", seed=0)
    aux = data.load_dataset("imdb", seed=0, max_examples=4000).train  # the attacker's own labelled text
    rows = []
    for name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
        for protection in [p.strip() for p in args.protections.split(",") if p.strip()]:
            row = _run(args, name, protection, ds, aux)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "label_leakage.json").write_text(json.dumps(rows, indent=2))
    if args.generation_steps:
        rows += _generation(args)
        (args.out / "label_leakage.json").write_text(json.dumps(rows, indent=2))
    print(f"{'defense':<8} {'protection':<20} {'dir-acc':>7} {'dir-AUC':>7} {'(chance)':>8} {'dir-AUC-known':>13} "
          f"{'norm-AUC':>8} {'learn-AUC':>9} {'test-acc':>8}")
    for r in rows:
        if r.get("task") == "generation":
            print(f"generation {r['protection']:<18} next-token top-1 {r['next-token-top1']:.3f} top-10 "
                  f"{r['next-token-top10']:.3f} over {r['positions']} positions")
            continue
        print(f"{r['defense']:<8} {r['protection']:<20} {r['direction-accuracy']:>7.3f} {r['direction-auc']:>7.3f} "
              f"{r['direction-auc-shuffled-labels']:>8.3f} {r['direction-auc-known-sign']:>13.3f} "
              f"{r['norm-auc']:>8.3f} {r['learned-auc']:>9.3f} {r['test-accuracy']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
