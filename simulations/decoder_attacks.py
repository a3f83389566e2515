"""The six attacks on what a SmolLM2 device releases (generation tasks, u-shaped protocol).

    python -m simulations.decoder_attacks --out DIR [--datasets rotten_tomatoes,bbc_news]
        [--defenses none,dchi,privtune] [--epsilon 64] [--max-victim 100] [--max-aux 300]
        [--attacks eia-knn,eia-mlp]

The device runs SmolLM2-135M's bottom (``--split-layer``, default 2) and releases each text through
its defence, built as a device builds it from its own training texts (PrivTune's importance from
the document-concentration cue; seeded noise, stated). The attacks are those of the
privacy-utility sweep (same aux corpora, keywords and attributes per dataset), under both attacker
protocols. Utility of generation (perplexity, ROUGE-L) comes from Flower runs
(``simulations.compare_runs generation``), not from here. Prints a table and writes
``DIR/decoder_attacks.json``.

For every PrivTune-family defence it also writes where the mean shift aims (``targets`` in the
JSON), on the victims' real tokens: the share of regular tokens whose target (the centroid of
their n-hop ring) has the token's own anchor as its nearest anchor; the norms of releases,
anchors, targets and shifts; the anchors' largest coordinate and the shift's mean on it; and the
nearest-anchor score (cosine, as EIA-1 reads it) of the clean release, the shifted one (no
noise), the clean one moved by the radius towards its target, its own anchor or the mean anchor,
and the clean one with the offset added that an attacker estimates from public text (the mean
anchor minus the mean release of the auxiliary texts through the same bottom).
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
    parser.add_argument("--attacks", default="", help="a comma list of attacks (default: all six)")
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

    chosen = [a.strip() for a in args.attacks.split(",") if a.strip()] or list(ATTACKS)
    unknown = [a for a in chosen if a not in ATTACKS]
    if unknown:
        parser.error(f"--attacks {unknown} is outside the accepted range: {', '.join(ATTACKS)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = quick_settings(max_victim=args.max_victim, max_aux=args.max_aux, max_length=args.max_length)
    split = load_split(args.model, args.split_layer, "generation", protocol="u-shaped", seed=0).without_middle()
    rows, targets = [], []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        ds = data.load_dataset(name, seed=0, max_examples=args.max_examples)
        victim = _sample(ds.test, args.max_victim, 0)
        inputs = attack_inputs(name, ds, victim, settings, 0)
        for defense_name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
            t0 = time.perf_counter()
            defense = device_defense(defense_name, split, epsilon=args.epsilon, texts=list(ds.train["text"]), labels=None,
                                     task="generation", max_length=args.max_length, seed=0)
            if getattr(defense, "targets", None) is not None:
                targets.append({"dataset": name, "defense": defense_name,
                                **aim(split, defense, list(victim["text"]), inputs["aux_texts"], args.max_length)})
                print(f"[decoder-attacks] {name} {defense_name}: targets {targets[-1]}", flush=True)
            plain = [a for a in chosen if a != "aia-attribute" or inputs["attr_aux_texts"] is None]
            jobs = [(inputs["aux_texts"], plain)] if plain else []
            if inputs["attr_aux_texts"] is not None and "aia-attribute" in chosen:
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
            (args.out / "decoder_attacks.json").write_text(json.dumps({"rows": rows, "targets": targets}, indent=1))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    print("| dataset | defence | " + " | ".join(f"{a} (adaptive / static)" for a in attacks) + " |")
    print("|---|---|" + "---|" * len(attacks))
    for key in dict.fromkeys((r["dataset"], r["defense"]) for r in rows):
        mine = {(r["attack"], r["protocol"]): r["asr"] for r in rows if (r["dataset"], r["defense"]) == key}
        cells = [" / ".join(f"{mine[(a, p)]:.3f}" if (a, p) in mine else "-" for p in PROTOCOLS) for a in attacks]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    print(f"written {args.out / 'decoder_attacks.json'}")
    return 0


def aim(split, defense, victim_texts: list[str], aux_texts: list[str], max_length: int) -> dict:
    """Where a PrivTune-family defence's mean shift points (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from privtune_flwr.mechanism.anchors import nearest_anchor, real_token_mask

    anchors, tg = defense.anchors.float(), defense.targets.float()
    ids = defense.regular_ids  # the defence's own list of the tokens a target is built for
    regular = torch.zeros(len(anchors), dtype=torch.bool)
    regular[ids] = True
    mean_anchor = anchors[regular].mean(0)

    def clean(texts):
        enc = split.tokenize(texts, max_length)
        with torch.no_grad():
            h = split.bottom(enc["input_ids"], enc["attention_mask"]).float()
        return enc, h, real_token_mask(enc["input_ids"], enc["attention_mask"], split.special_ids)

    enc, h_all, real = clean(victim_texts)
    with torch.no_grad():
        shift = defense.mean_shift(h_all, enc["input_ids"], enc["attention_mask"])[real]
    tok, h = enc["input_ids"][real], h_all[real]
    a, t, r = anchors[tok], tg[tok], float(defense.radius)
    _, h_aux, real_aux = clean(list(aux_texts))
    offset = mean_anchor - h_aux[real_aux].mean(0)

    def knn(x):
        return float((nearest_anchor(x, anchors) == tok).float().mean())

    def towards(goal):
        return h + r * F.normalize(goal - h, dim=-1)

    top = int(anchors[regular].abs().mean(0).argmax())
    return {"target-nearest-is-own": float((nearest_anchor(tg[ids], anchors) == ids).float().mean()),
            "radius": r, "norm-release": float(h.norm(dim=-1).median()), "norm-anchor": float(a.norm(dim=-1).median()),
            "norm-target": float(t.norm(dim=-1).median()), "norm-shift": float(shift.norm(dim=-1).median()),
            "anchor-top-coordinate": top, "anchor-top-mean-abs": float(anchors[regular, top].abs().mean()),
            "release-top-mean-abs": float(h[:, top].abs().mean()), "shift-top-mean": float(shift[:, top].mean()),
            "cos-shift-to-target": float(F.cosine_similarity(shift, t - h, dim=-1).mean()),
            "cos-release-own-anchor": float(F.cosine_similarity(h, a, dim=-1).mean()),
            "cos-shifted-own-anchor": float(F.cosine_similarity(h + shift, a, dim=-1).mean()),
            "knn-clean": knn(h), "knn-shifted": knn(h + shift), "knn-towards-target": knn(towards(t)),
            "knn-towards-own-anchor": knn(towards(a)), "knn-towards-mean-anchor": knn(towards(mean_anchor.expand_as(h))),
            "knn-clean-with-public-offset": knn(h + offset), "victim-tokens": int(real.sum()),
            "aux-texts": len(aux_texts)}


if __name__ == "__main__":
    raise SystemExit(main())
