"""Offsite tuning's utility at convergence, on the privacy-utility sweep's own data and stopping rule.

One device holds the sweep's whole training part (``simulations.privacy_utility.point_data``: the
same examples, validation hold-out and test split as the sweep's points, so a row here sits beside
the u-shaped rows of that sweep). The device tunes the emulator's adapters (``privtune_flwr.offsite``,
FedBiOT or ScaleOT, built exactly as the Flower app builds it) with one AdamW optimiser; every
``eval_every`` steps the adapters are plugged into the full model and scored on the validation
split, and training stops after ``patience`` scores without a new best, or at ``max_steps``
(:class:`simulations.training.StopRule`, the sweep's loop). The best adapters are scored on the
test split, plugged into the full model and in the emulator.

Generation (BBC headlines, SmolLM2): test perplexity over every real next-token pair, and the
ROUGE-L of greedy headlines for the sweep's first ``max_generate`` test prompts. Classification:
accuracy (macro-F1 beside it).

Device cost per step: the wall time of one local step (forward, backward and AdamW on the
emulator) and the process's peak resident memory, which also holds the full model used for
scoring (a device of the app holds both too: it builds the emulator from the public weights).
Bytes: the adapters, each way, per round.

``python -m simulations.offsite_utility --out DIR [--methods fedbiot,scaleot] [--dataset bbc_headlines]
[--max-steps N] [--seed S]`` prints a table and writes ``results.json`` after each method.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from privtune_flwr import data, offsite
from privtune_flwr.config import RunConfig
from privtune_flwr.device import generated_text, mean_rouge_l
from simulations.privacy_utility import GENERATION_COMMON, GENERATION_DATASETS, HEADLINE_COMMON, full_settings, point_data
from simulations.training import StopRule, _to_convergence


class _Lengths:
    """What the sweep's loop reads of a training set: its size and each example's token count."""

    def __init__(self, off: offsite.Offsite, texts: list[str], max_length: int):
        self.texts = list(texts)
        self.lengths = torch.tensor([len(offsite._encode(off, [t], max_length)[0][0]) for t in self.texts])

    def __len__(self) -> int:
        return len(self.texts)


@torch.no_grad()
def test_scores(off: offsite.Offsite, texts: list[str], labels, max_length: int, *, emulator: bool) -> dict:
    """``offsite.score`` (the app's own scoring), with the number of next-token pairs scored."""
    out = dict(offsite.score(off, texts, labels, emulator=emulator, max_length=max_length))
    if off.task == "generation":
        pairs = 0
        for at in range(0, len(texts), 32):
            _, mask = offsite._encode(off, texts[at:at + 32], max_length)
            pairs += int((mask[:, 1:] * mask[:, :-1]).sum())
        out["tokens"] = float(pairs)
    return out


@torch.no_grad()
def greedy_rouge(off: offsite.Offsite, rows, max_length: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """ROUGE-L of the plugged-in full model's greedy continuations (one prompt at a time, the
    prompt's last ``max_length - max_new_tokens`` tokens, as the sweep cuts them)."""
    model, tok = off.full, off.tokenizer
    model.eval()
    budget = max_length - max_new_tokens
    texts = []
    for prompt in rows["prompt"]:
        ids = tok(prompt, return_tensors="pt")["input_ids"][:, -budget:]
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        texts.append(generated_text(tok, seq[0].tolist(), ids.shape[1]))
    return mean_rouge_l(list(rows["target"]), texts), texts


def run_method(method: str, dataset: str, settings, *, seed: int, distill_steps: int = RunConfig.distill_steps,
               emulator_drop: float = RunConfig.emulator_drop, log_fn=print) -> dict:
    generation = dataset in GENERATION_DATASETS
    task = "generation" if generation else "classification"
    length = settings.length_for(dataset)
    ds, train, validation, test, _ = point_data(dataset, seed, settings)
    model = settings.generation_model if generation else settings.model
    defaults = RunConfig()
    off = offsite.build_offsite(model, task=task, num_labels=max(ds.num_labels, 2) if not generation else 2,
                                method=method, adapter_layers=defaults.offsite_adapter_layers,
                                emulator_drop=emulator_drop, distill_steps=distill_steps,
                                svd_rank_fraction=defaults.svd_rank_fraction, lora_rank=defaults.lora_rank,
                                lora_targets=defaults.lora_targets, max_length=length, aux_dataset=dataset, seed=seed)
    log_fn(f"{method}: emulator blocks {off.kept} of {off.num_layers}, {off.report['parameter-ratio']:.3f} of the "
           f"parameters, adapters {off.adapter_bytes():,} bytes")
    labels = None if generation else list(train["label"])
    train_set = _Lengths(off, train["text"], length)
    params = [p for p in off.emulator.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    step_seconds = []

    def train_batch(index) -> list[float]:
        t0 = time.perf_counter()
        ids, mask = offsite._encode(off, [train_set.texts[i] for i in index], length)
        y = None if generation else torch.tensor([labels[i] for i in index], dtype=torch.long)
        off.emulator.train()
        loss = offsite._loss(off, off.emulator, ids, mask, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        off.emulator.eval()
        step_seconds.append(time.perf_counter() - t0)
        return [float(loss.detach())]

    val_labels = None if generation else list(validation["label"])

    def validate():
        off.load_adapters(off.adapter_state(emulator=True))  # plugged into the full model
        s = offsite.score(off, list(validation["text"]), val_labels, emulator=False, max_length=length)
        if generation:
            return -s["loss"], s["perplexity"], s["loss"]
        return s["accuracy"], s["accuracy"], s["loss"]

    def load_state(state):
        off.load_adapters(state, emulator=True)

    rule = StopRule(patience=settings.patience, eval_every=settings.eval_every, max_steps=settings.max_steps)
    t0 = time.perf_counter()
    run = _to_convergence(train_set, settings.batch_size, train_batch, validate,
                          lambda: off.adapter_state(emulator=True), load_state, [optimizer], rule, seed=seed,
                          metric="perplexity" if generation else "accuracy", progress=False)
    train_seconds = time.perf_counter() - t0
    best = off.adapter_state(emulator=True)
    off.load_adapters(best)
    test_labels = None if generation else list(test["label"])
    plugged = test_scores(off, list(test["text"]), test_labels, length, emulator=False)
    emulated = test_scores(off, list(test["text"]), test_labels, length, emulator=True)
    row = {"method": method, "dataset": dataset, "seed": seed, "model": model,
           "distill-steps": distill_steps, "emulator-drop": emulator_drop,
           "kept-blocks": off.kept, "num-layers": off.num_layers,
           "parameter-ratio": off.report["parameter-ratio"], "block-parameter-ratio": off.report["block-parameter-ratio"],
           "adapter-bytes-each-way": off.adapter_bytes(), "distill-error": [off.report["distill-error-before"],
                                                                             off.report["distill-error-after"]],
           "steps": run["steps"], "best_step": run["best_step"], "stopped_by": run["stopped_by"],
           "validation_curve": ";".join(f"{s}:{v:.4f}" for s, v, _ in run["history"]),
           "train-seconds": train_seconds, "seconds-per-step": sum(step_seconds) / max(len(step_seconds), 1),
           "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "batch-size": settings.batch_size, "learning-rate": settings.learning_rate,
           "test": plugged, "emulator-test": emulated}
    if generation:
        rows = test.select(range(min(settings.max_generate, len(test))))
        row["rouge_l"], texts = greedy_rouge(off, rows, length, settings.max_new_tokens)
        row["generated_example"] = texts[0] if texts else ""
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | distill steps | utility (full model) | emulator | ROUGE-L | steps (best) | stopped by | s/step | "
             "adapters each way |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = "perplexity" if "perplexity" in r["test"] else "accuracy"
        lines.append(f"| {r['method']} | {r.get('distill-steps', '-')} | {key} {r['test'][key]:.3f} | {r['emulator-test'][key]:.3f} | "
                     f"{r.get('rouge_l', float('nan')):.3f} | {r['steps']} ({r['best_step']}) | {r['stopped_by']} | "
                     f"{r['seconds-per-step']:.2f} | {r['adapter-bytes-each-way'] / 1e3:.0f} KB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(offsite.METHODS))
    p.add_argument("--dataset", default="bbc_headlines")
    p.add_argument("--max-steps", type=int, help=f"cap on local steps (default: the sweep's, {GENERATION_COMMON['max_steps']})")
    p.add_argument("--distill-steps", type=int, help=f"offsite.distill-steps (default: the app's, {RunConfig.distill_steps})")
    p.add_argument("--emulator-drop", type=float, help=f"offsite.emulator-drop (default: the app's, {RunConfig.emulator_drop})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in offsite.METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods {args.methods!r}: accepted: a comma list of {', '.join(offsite.METHODS)}")
    if args.dataset not in data.DATASETS:
        raise SystemExit(f"--dataset {args.dataset!r}: accepted: {', '.join(data.DATASETS)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps {args.max_steps}: accepted: >= 1")
    if args.distill_steps is not None and args.distill_steps < 0:
        raise SystemExit(f"--distill-steps {args.distill_steps}: accepted: >= 0")
    if args.emulator_drop is not None and not 0 < args.emulator_drop < 1:
        raise SystemExit(f"--emulator-drop {args.emulator_drop}: accepted: (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # the sweep's sizes and stopping rule for the dataset's kind (its generation or headline points)
    common = GENERATION_COMMON if args.dataset in GENERATION_DATASETS else HEADLINE_COMMON
    over = {**common, "datasets": (args.dataset,), "seeds": (args.seed,)}
    if args.max_steps is not None:
        over["max_steps"] = args.max_steps
    settings = full_settings(**over)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    # the emulator's build, the app's defaults unless given
    distill = RunConfig.distill_steps if args.distill_steps is None else args.distill_steps
    drop = RunConfig.emulator_drop if args.emulator_drop is None else args.emulator_drop
    done = {(r["method"], r["dataset"], r["seed"], r.get("distill-steps"), r.get("emulator-drop")) for r in rows}
    for method in methods:
        if (method, args.dataset, args.seed, distill, drop) in done:
            print(f"{method}: stored, skipped")
            continue
        rows.append(run_method(method, args.dataset, settings, seed=args.seed, distill_steps=distill, emulator_drop=drop))
        path.write_text(json.dumps({"rows": rows}, indent=1))
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
