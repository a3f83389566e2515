"""The attacks on offsite tuning's adapter updates, over many victims (privtune_flwr/attacks/updates.py).

Each victim is a few training sentences that one device's update covers. Two attackers:

* ``passive``: the run's own configuration (LoRA rank 8, ``train.learning-rate``, 8 local steps),
  adapters that 20 steps of training on public labelled text produced;
* ``active``: the cloud's chosen run config (LoRA rank 64, one local step, a batch of the victim's
  sentences) and adapters (block 0's ``A`` zero, its ``B`` tiny).

Reported per cell: the share of the victim's (token, position) pairs recovered at a budget of
their number, beside the blind floor (the same number of the most frequent pairs of public
text), and how often the head's bias names the batch's majority label, beside the majority rate
of the attacker's public labelled data. A generation task (a decoder) is scored on the batch's
distinct tokens (``attack_tokens``), with one more guess, ``mixed-recall``: the tokens of the
update's own ``r`` directions (its numerical rank), the rest of the budget filled blind.

``python -m simulations.offsite_attacks --out DIR`` prints the table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from privtune_flwr import data, offsite
from privtune_flwr.attacks.updates import (active_adapters, attack_tokens, attack_update, device_update, frequent_pairs,
                                           frequent_tokens, head_bias_key, real_pairs, real_tokens)
from privtune_flwr.config import RunConfig
from simulations.privacy_utility import SweepSettings


# -- the experiment ---------------------------------------------------------------------------------


def run(*, model: str = "minilm", method: str = "fedbiot", dataset: str = "rotten_tomatoes", victims: int = 20,
        sentences: tuple[int, ...] = (1, 3, 5), modes: tuple[str, ...] = ("passive", "active"), max_length: int | None = None,
        passive_rank: int = RunConfig.lora_rank, active_rank: int = 64, local_steps: int = RunConfig.local_steps,
        learning_rate: float = RunConfig.learning_rate,
        warm_steps: int = 20, distill_steps: int = 20, seed: int = 0, out: Path | None = None, log=print) -> dict:
    """Every (mode, sentences per update) cell over ``victims`` updates; see the module docstring."""
    torch.manual_seed(seed)
    ds = data.load_dataset(dataset, seed=seed)
    task = ds.task
    max_length = max_length or SweepSettings().length_for(dataset)  # the sweep's: 64 tokens, generation 128
    generation = task == data.GENERATION
    aux = offsite.auxiliary_texts(dataset, 2000, seed)
    aux_labelled = data.load_dataset(offsite.auxiliary_dataset(dataset), seed=seed, max_examples=2000).train
    aux_majority = Counter(aux_labelled["label"]).most_common(1)[0][0]  # the blind guess of every batch's majority
    train = ds.train
    if generation:  # what a device trains on: prompt + continuation, as the app and the sweep join them
        pairs = [data.generation_pair(dataset, t, g) for t, g in zip(train["text"], train["target"])]
        train = train.remove_columns("text").add_column("text", [a + b for a, b in pairs])
    per_victim = []
    results = {"model": model, "method": method, "dataset": dataset, "victims": victims, "seed": seed,
               "max-length": max_length, "cells": [], "per-victim": per_victim}
    builds = {}
    for mode in modes:
        rank = passive_rank if mode == "passive" else active_rank
        if rank not in builds:
            t0 = time.perf_counter()
            builds[rank] = offsite.build_offsite(model, task=task, num_labels=2, method=method, lora_rank=rank,
                                                 distill_steps=distill_steps, max_length=max_length,
                                                 aux_dataset=dataset, seed=seed)
            log(f"[offsite-attacks] {method} emulator with LoRA rank {rank}: blocks {builds[rank].kept} "
                f"({time.perf_counter() - t0:.0f} s)")
        off = builds[rank]
        special = set(off.tokenizer.all_special_ids)
        vocab = torch.tensor([t for t in range(off.tokenizer.vocab_size) if t not in special])
        blind = (frequent_tokens if generation else frequent_pairs)(off, aux, max_length, special)
        # the adapters a cloud would send mid-training: warm_steps of the device's own training on public text
        start = off.adapter_state(emulator=True)
        if warm_steps:
            warm = []
            for at in range(warm_steps):
                rows = aux_labelled.select([(at * 16 + j) % len(aux_labelled) for j in range(16)])
                ids, mask = offsite._encode(off, rows["text"], max_length)
                warm.append((ids, mask, None if generation else torch.tensor(rows["label"], dtype=torch.long)))
            start = device_update(off, start, warm, learning_rate=learning_rate, seed=seed)
        for k in sentences:
            rng = torch.Generator().manual_seed(seed * 7_919 + k)
            recalls, floors, label_hits, label_blind, ranks, seconds, mixed = [], [], [], [], [], [], []
            for v in range(victims):
                rows = train.select(torch.randperm(len(train), generator=rng)[:k].tolist())
                ids, mask = offsite._encode(off, rows["text"], max_length)
                labels = None if generation else torch.tensor(rows["label"], dtype=torch.long)
                truth = (real_tokens if generation else real_pairs)(ids, mask, special)
                sent = active_adapters(off, start, seed + v) if mode == "active" else start
                steps = 1 if mode == "active" else local_steps
                t0 = time.perf_counter()
                returned = device_update(off, sent, [(ids, mask, labels)] * steps, learning_rate=learning_rate,
                                         seed=seed * 1_000 + v)
                if generation:
                    guess, r = attack_tokens(off, sent, returned, n=len(truth), candidates=vocab)
                    # the adaptive guess: the update's own r directions' tokens, the rest filled blind
                    lead, _ = attack_tokens(off, sent, returned, n=min(r, len(truth)), candidates=vocab)
                    fill = [t for t in blind if t not in lead][:len(truth) - len(lead)]
                    mixed.append(len((lead | set(fill)) & truth) / len(truth))
                else:
                    guess, r = attack_update(off, sent, returned, n=len(truth), positions=int(ids.shape[1]),
                                             candidates=vocab)
                seconds.append(time.perf_counter() - t0)
                recalls.append(len(guess & truth) / len(truth))
                floors.append(len(set(blind[:len(truth)]) & truth) / len(truth))
                ranks.append(r)
                victim = {"mode": mode, "sentences": k, "tokens": len(truth), "recovered": len(guess & truth),
                          "blind": floors[-1], "update-rank": r}
                if not generation:  # a generation task has no head to read
                    bias = head_bias_key(off)
                    rise = returned[bias] - sent[bias]
                    counts = torch.bincount(labels, minlength=2)
                    if int((counts == counts.max()).sum()) == 1:  # a tie has no majority to name
                        label_hits.append(float(int(rise.argmax()) == int(counts.argmax())))
                        label_blind.append(float(int(counts.argmax()) == aux_majority))
                    victim.update({"labels": labels.tolist(), "bias-rise": rise.tolist()})
                per_victim.append(victim)
            cell = {"mode": mode, "lora-rank": rank, "sentences": k, "local-steps": 1 if mode == "active" else local_steps,
                    "token-recall": sum(recalls) / victims, "token-recall-sd": _sd(recalls),
                    "blind-floor": sum(floors) / victims,
                    "mixed-recall": sum(mixed) / victims if mixed else float("nan"),
                    "label-accuracy": sum(label_hits) / len(label_hits) if label_hits else float("nan"),
                    "label-scored": len(label_hits),
                    "label-floor": sum(label_blind) / len(label_blind) if label_blind else float("nan"),
                    "update-rank-mean": sum(ranks) / victims,
                    "seconds-per-victim": sum(seconds) / victims}
            results["cells"].append(cell)
            if out is not None:  # after every cell: a long run keeps what it measured
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(results, indent=2))
            log(f"[offsite-attacks] {mode:7s} rank {rank:3d}, {k} sentence(s): token recall "
                f"{cell['token-recall']:.3f} (blind {cell['blind-floor']:.3f}; span then blind "
                f"{cell['mixed-recall']:.3f}), label {cell['label-accuracy']:.2f} "
                f"(floor {cell['label-floor']:.2f}), update rank {cell['update-rank-mean']:.1f}")
    return results


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def table(results: dict) -> str:
    lines = ["| attacker | LoRA rank | sentences per update | local steps | token recall (blind floor) | "
             "majority label, victims with one (floor) | update rank |", "|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        lines.append(f"| {c['mode']} | {c['lora-rank']} | {c['sentences']} | {c['local-steps']} | "
                     f"{c['token-recall']:.3f} ± {c['token-recall-sd']:.3f} ({c['blind-floor']:.3f}) | "
                     + (f"{c['label-accuracy']:.2f} of {c['label-scored']} ({c['label-floor']:.2f})" if c["label-scored"] else "-")
                     + f" | {c['update-rank-mean']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="fedbiot", choices=offsite.METHODS)
    p.add_argument("--dataset", default="rotten_tomatoes")
    p.add_argument("--victims", type=int, default=20)
    p.add_argument("--sentences", default="1,3,5", help="sentences per update, a comma list")
    p.add_argument("--modes", default="passive,active")
    p.add_argument("--active-rank", type=int, default=64)
    p.add_argument("--max-length", type=int, help="tokens per training text (default: the sweep's, 64; generation 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in ("passive", "active")]
    if bad:
        p.error(f"--modes {bad} is outside the accepted range: passive, active")
    sentences = tuple(int(s) for s in a.sentences.split(","))
    if any(s < 1 for s in sentences) or a.victims < 1:
        p.error("--sentences and --victims take integers >= 1")
    if a.max_length is not None and a.max_length < 2:
        p.error(f"--max-length {a.max_length} is outside the accepted range: >= 2")
    res = run(model=a.model, method=a.method, dataset=a.dataset, victims=a.victims, sentences=sentences, modes=modes,
              active_rank=a.active_rank, max_length=a.max_length, seed=a.seed, out=a.out)
    print(table(res))
    print(f"[offsite-attacks] wrote {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
