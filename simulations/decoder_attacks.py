"""The six attacks on what a SmolLM2 device releases (generation tasks, u-shaped protocol).

    python -m simulations.decoder_attacks --out DIR [--datasets rotten_tomatoes,bbc_news]
        [--defenses none,dchi,privtune] [--epsilon 64] [--max-victim 100] [--max-aux 300]

The device runs SmolLM2-135M's bottom (``--split-layer``, default 2) and releases each text through
its defence, built as a device builds it from its own training texts (PrivTune's importance from
the document-concentration cue; seeded noise, stated). The attacks are those of the
privacy-utility sweep (same aux corpora, keywords and attributes per dataset), under both attacker
protocols. Utility of generation (perplexity, ROUGE-L) comes from Flower runs
(``simulations.compare_runs generation``), not from here. Prints a table and writes
``DIR/decoder_attacks.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--datasets", default="rotten_tomatoes")
    parser.add_argument("--defenses", default="none,dchi,privtune")
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--split-layer", type=int, default=2)
    parser.add_argument("--max-victim", type=int, default=100)
    parser.add_argument("--max-aux", type=int, default=300)
    parser.add_argument("--max-examples", type=int, default=2000, help="device training texts (importance)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for key in ("max_victim", "max_aux", "max_examples", "max_length", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}={getattr(args, key)} is outside the accepted range: >= 1")

    import torch

    from privtune_flwr import data
    from privtune_flwr.attacks import ATTACKS, PROTOCOLS, run_attacks
    from privtune_flwr.device import device_defense
    from privtune_flwr.models import load_split
    from simulations.privacy_utility import _sample, attack_inputs, quick_settings

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = quick_settings(max_victim=args.max_victim, max_aux=args.max_aux, max_length=args.max_length)
    split = load_split(args.model, args.split_layer, "generation", protocol="u-shaped", seed=0).without_middle()
    rows = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        ds = data.load_dataset(name, seed=0, max_examples=args.max_examples)
        victim = _sample(ds.test, args.max_victim, 0)
        inputs = attack_inputs(name, ds, victim, settings, 0)
        for defense_name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
            t0 = time.perf_counter()
            defense = device_defense(defense_name, split, epsilon=args.epsilon, texts=list(ds.train["text"]), labels=None,
                                     task="generation", max_length=args.max_length, seed=0)
            jobs = [(inputs["aux_texts"], [a for a in ATTACKS if a != "aia-attribute" or inputs["attr_aux_texts"] is None])]
            if inputs["attr_aux_texts"] is not None:
                jobs.append((inputs["attr_aux_texts"], ["aia-attribute"]))
            for aux_texts, names in jobs:
                with_attr = "aia-attribute" in names
                results = run_attacks(split, defense, aux_texts, list(victim["text"]), names=names,
                                      aux_attributes={inputs["attribute"]: inputs["aux_attr"]} if with_attr else None,
                                      victim_attributes={inputs["attribute"]: inputs["victim_attr"]} if with_attr else None,
                                      attribute=inputs["attribute"] if with_attr else None, keywords=inputs["keywords"],
                                      max_length=args.max_length, seed=0, protocols=PROTOCOLS)
                for r in results:
                    rows.append({"dataset": name, "model": args.model, "split_layer": args.split_layer, "defense": defense_name,
                                 "epsilon": None if defense_name == "none" else args.epsilon, "attack": r["attack"],
                                 "protocol": r["protocol"], "asr": float(r["asr"]), "asr_clean": float(r["asr_clean"]),
                                 "victim_examples": len(victim), "aux_examples": len(aux_texts)})
            print(f"[decoder-attacks] {name} {defense_name}: {time.perf_counter() - t0:.0f} s", flush=True)
            (args.out / "decoder_attacks.json").write_text(json.dumps(rows, indent=1))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    print("| dataset | defence | " + " | ".join(f"{a} (adaptive / static)" for a in attacks) + " |")
    print("|---|---|" + "---|" * len(attacks))
    for key in dict.fromkeys((r["dataset"], r["defense"]) for r in rows):
        mine = {(r["attack"], r["protocol"]): r["asr"] for r in rows if (r["dataset"], r["defense"]) == key}
        cells = [" / ".join(f"{mine[(a, p)]:.3f}" if (a, p) in mine else "-" for p in PROTOCOLS) for a in attacks]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    print(f"written {args.out / 'decoder_attacks.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
