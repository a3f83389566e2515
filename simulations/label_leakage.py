"""How much the u-shaped gradients tell the cloud about the device's labels.

    python -m simulations.label_leakage --out DIR [--steps 100] [--defenses none,dchi,privtune]

Rotten Tomatoes, MiniLM split after block 1, u-shaped: one device trains its head while the cloud
trains the middle, in process, on batches released through each defence (seeded noise, stated).
Every gradient the device returns is kept and attacked (``privtune_flwr.attacks.gradient``): the
direction attack with one known label per step, and the sign-free AUC. Prints a table and writes
``DIR/label_leakage.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--defenses", default="none,dchi,privtune")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from privtune_flwr import data
    from privtune_flwr.attacks.gradient import label_inference
    from privtune_flwr.cloud import MiddleSide
    from privtune_flwr.device import DeviceHead, DeviceSide, device_defense
    from privtune_flwr.models import load_split

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ds = data.load_dataset("rotten_tomatoes", seed=0)
    rows = []
    for name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
        t0 = time.perf_counter()
        split = load_split("minilm", 1, num_labels=2, lora_rank=8, protocol="u-shaped", seed=0)
        defense = device_defense(name, split, epsilon=args.epsilon, texts=ds.train["text"], labels=ds.train["label"], seed=0)
        device = DeviceSide(split, defense, max_length=64, audit_tokens=0)
        cloud, head = MiddleSide(split, learning_rate=1e-3), DeviceHead(split, learning_rate=1e-3)
        order = list(range(len(ds.train)))
        random.Random(0).shuffle(order)
        steps, losses = [], []
        for step in range(args.steps):
            batch = ds.train.select(order[step * args.batch:(step + 1) * args.batch])
            rel = device.release(batch["text"])
            labels = torch.tensor(list(batch["label"]))
            out = cloud.forward(str(step), rel.hidden, rel.attention_mask)
            grad, loss = head.step(out, rel.attention_mask, labels)
            cloud.backward(str(step), grad)
            cloud.step()
            steps.append((grad, labels))
            losses.append(loss)
        early, late = label_inference(steps[: args.steps // 2]), label_inference(steps[args.steps // 2:])
        row = {"defense": name, "epsilon": None if name == "none" else args.epsilon, "steps": args.steps,
               "accuracy": label_inference(steps)["accuracy"], "auc": label_inference(steps)["auc"],
               "majority": label_inference(steps)["majority"], "accuracy-first-half": early["accuracy"],
               "accuracy-second-half": late["accuracy"], "final-loss": sum(losses[-10:]) / 10,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "label_leakage.json").write_text(json.dumps(rows, indent=2))
    print(f"{'defense':<10} {'accuracy':>9} {'AUC':>6} {'majority':>9} {'1st half':>9} {'2nd half':>9}")
    for r in rows:
        print(f"{r['defense']:<10} {r['accuracy']:>9.3f} {r['auc']:>6.3f} {r['majority']:>9.3f} "
              f"{r['accuracy-first-half']:>9.3f} {r['accuracy-second-half']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
