"""Token substitution: what a change to the mechanism must do to reach the inversion targets.

PrivTune's shift moves each token at most ``r`` towards a target fixed by the token (its ring
centroid), so an adaptive learned inverter reads it back (README, "Privacy against utility").
This script measures the limit cases of the obvious fix, "really become another token":

==================  =============================================================================
variant             what a device releases for a real token ``w_i`` (plus PrivTune's importance-
                    scaled d_chi noise ``s_i z_i`` at ε in every case)
==================  =============================================================================
``swap-ring:n``     ``h_i + A[m_i] - A[w_i]``: the shift goes all the way to a ring member ``m_i``
                    drawn per release uniformly from ``N_n(w_i)`` (``n = 1``: the k-NN
                    neighbours), keeping the token's context. The limit of OPT-1 with λ = μ = 0
                    and a radius that reaches the drawn target.
``subst-ring:n``    the device replaces ``w_i`` by ``m_i`` *before* the bottom and releases the
                    bottom's output for the substituted sentence.
``subst-uniform``   as ``subst-ring`` with ``m_i`` uniform over the regular vocabulary
                    (randomised response over tokens).
==================  =============================================================================

``keep`` (third field, default 0): tokens whose importance (``mechanism/importance.py``, mixing
``alpha``, the fourth field) is in the top ``keep`` share of the device's own token occurrences
are never substituted, so the task keeps its most informative words.

For the input-level variants the table also gives ``ceiling``: the token recovery of the best
possible attacker that sees the substituted ids exactly and knows the token prior (estimated on
the auxiliary corpus), by Bayes' rule. It bounds what EIA-1/EIA-2 can reach from the
substitution alone and shows whether a variant *can* meet the target before any training.

Every point uses the headline settings of ``simulations.privacy_utility`` (Rotten Tomatoes,
MiniLM split after block 1, the top fine-tuned to convergence on a held-out validation split,
500 victim sentences, the six attacks under both attacker protocols, trained on 1,000 IMDB
reviews), so its rows line up with the headline table. ``python -m simulations.substitution --out
outputs/substitution [--variants ...] [--seed N]``: resumable like the sweep; writes
``results.json`` and ``results.csv`` and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from privtune_flwr import data
from privtune_flwr.accounting import PrivacyStatement
from privtune_flwr.config import RunConfig
from privtune_flwr.defenses import PrivTuneDefense
from privtune_flwr.device import device_defense
from privtune_flwr.mechanism.anchors import real_token_mask
from privtune_flwr.mechanism.dchi import dchi_from_stream
from privtune_flwr.models import load_split

from .privacy_utility import (HEADLINE_COMMON, _atomic_write, _load_point, dataset_context, full_settings, run_point,
                              write_results)

MODES = ("swap-ring", "subst-ring", "subst-uniform")
DEFAULT_VARIANTS = (
    "none", "privtune", "swap-ring:2", "subst-ring:2", "subst-ring:1",
    "subst-uniform:0:0.05", "subst-uniform:0:0.1:0", "subst-uniform:0:0.2:0",
)
DATASET = "rotten_tomatoes"
EPSILON = 64.0


def parse_variant(spec: str) -> dict:
    """``mode[:hops[:keep[:alpha]]]`` (or ``none`` / ``privtune``) -> a dict; clear errors."""
    parts = spec.strip().split(":")
    if parts[0] in ("none", "privtune") and len(parts) == 1:
        return {"tag": parts[0], "mode": parts[0]}
    if parts[0] not in MODES:
        raise ValueError(f"variant mode {parts[0]!r} is unknown; accepted: none, privtune, {', '.join(MODES)}")
    if len(parts) > 4:
        raise ValueError(f"variant {spec!r} has too many fields; accepted: mode[:hops[:keep[:alpha]]]")
    try:
        hops = int(parts[1]) if len(parts) > 1 else (0 if parts[0] == "subst-uniform" else 2)
        keep = float(parts[2]) if len(parts) > 2 else 0.0
        alpha = float(parts[3]) if len(parts) > 3 else 0.5
    except ValueError:
        raise ValueError(f"variant {spec!r} is malformed; accepted: mode[:hops[:keep[:alpha]]] with numbers") from None
    if parts[0] != "subst-uniform" and hops < 1:
        raise ValueError(f"hops={hops} in {spec!r} is outside the accepted range: an integer >= 1")
    if not 0.0 <= keep < 1.0:
        raise ValueError(f"keep={keep} in {spec!r} is outside the accepted range [0, 1)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} in {spec!r} is outside the accepted range [0, 1]")
    return {"tag": spec.strip(), "mode": parts[0], "hops": hops, "keep": keep, "alpha": alpha}


class SubstitutionDefense(PrivTuneDefense):
    """The variants above. Importance, noise scale and d_chi noise are PrivTune's."""

    def __init__(self, split, epsilon: float, *, mode: str, hops: int, keep: float, alpha: float = 0.5,
                 importance=None, seed=None, key=None, **options):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; accepted: {', '.join(MODES)}")
        super().__init__(split, epsilon, seed=seed, key=key, alpha=alpha, importance=importance, **options)
        self.name = f"{mode}:{hops}:{keep:g}:{alpha:g}"
        self.mode, self.hops, self.keep = mode, hops, keep
        self._bottom = split.bottom
        if mode != "subst-uniform" and hops == 1:
            self.candidates, self.sizes = self.tables.knn.long(), torch.full((self.vocab_size,), self.tables.knn.shape[1])
        elif mode != "subst-uniform":
            if hops != self.n_hops:
                raise ValueError(f"hops={hops} differs from n_hops={self.n_hops}; build the defence with n_hops={hops}")
            self.candidates, self.sizes = self.rings, self.ring_sizes
        self.threshold = float("inf")
        if keep > 0:
            if not isinstance(importance, dict):
                raise ValueError("keep > 0 needs importance={'sequences', 'labels', 'task'} (the device's own corpus)")
            occurrences = self.importance[self._regular_occurrences(importance["sequences"])]
            self.threshold = float(torch.quantile(occurrences, 1.0 - keep))
        kept = self.importance >= self.threshold
        kept[self.special_ids[self.special_ids < self.vocab_size]] = True
        self.register_buffer("kept_ids", kept, persistent=False)  # fixed once built: not per release

    def _regular_occurrences(self, sequences) -> torch.Tensor:
        ids = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)
        return ids[~torch.isin(ids, self.special_ids)]

    def kept(self) -> torch.Tensor:
        """[V] bool: released as itself (specials, and the top-``keep`` important tokens)."""
        return self.kept_ids

    def mechanism_config(self) -> dict:
        return {**super().mechanism_config(), "variant": self.name}

    def draw(self, input_ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.mode == "subst-uniform":
            pick = torch.minimum((u * len(self.regular_ids)).long(), torch.tensor(len(self.regular_ids) - 1))
            return self.regular_ids[pick]
        sizes = self.sizes[input_ids].clamp_min(1)
        member = self.candidates[input_ids, torch.minimum((u * sizes).long(), sizes - 1)]
        return torch.where(member < 0, input_ids, member)  # an empty ring keeps the token

    def perturb(self, hidden, input_ids, attention_mask):
        lengths = attention_mask.bool().sum(1).tolist()
        streams = self.streams(input_ids, attention_mask)
        u = self.scatter([st.uniform((n,)) for st, n in zip(streams, lengths)], attention_mask)
        noise = self.scatter([dchi_from_stream(st, n, hidden.shape[-1], self.epsilon) for st, n in zip(streams, lengths)],
                             attention_mask)
        noise.mul_(self.noise_scale(input_ids).unsqueeze(-1))
        gate = attention_mask.bool() & ~self.kept_ids[input_ids]
        member = torch.where(gate, self.draw(input_ids, u), input_ids)
        if self.mode == "swap-ring":
            return hidden + (self.anchors[member] - self.anchors[input_ids]) + noise
        return self._bottom(member, attention_mask).float() + noise

    def statement(self) -> PrivacyStatement:
        return PrivacyStatement(defense=self.name, epsilon=self.epsilon, scales=self.scales,
                                experimental="no formal statement is computed for this variant; measured by the attacks only",
                                **self._key_words())

    def substituted_share(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
        real = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        return float((real & ~self.kept_ids[input_ids]).sum() / real.sum().clamp_min(1))


def substitution_ceiling(candidates: torch.Tensor | None, prior: torch.Tensor, victim_ids: torch.Tensor,
                         kept: torch.Tensor, regular: torch.Tensor) -> float:
    """Best expected top-1 recovery of ``victim_ids`` from the substituted ids alone (Bayes rule).

    ``candidates`` [V, M] (-1 padded): each non-kept token becomes a uniform member of its row
    (an empty row: itself); ``None``: a uniform member of ``regular`` (ids). ``kept`` [V] bool:
    released as itself. ``prior`` [V]: the attacker's token prior.
    """
    vocab = prior.shape[0]
    prior = prior.double()
    if candidates is None:
        free = torch.zeros(vocab, dtype=torch.bool)
        free[regular] = True
        free &= ~kept
        q = 1.0 / len(regular)
        w_star = int(torch.argmax(torch.where(free, prior, torch.full_like(prior, -1.0))))
        # id m is guessed as itself when it is kept and its own prior beats w*'s share, else as w*
        own = kept & (prior >= prior[w_star] * q)
        hit = torch.zeros(vocab, dtype=torch.double)
        hit[own] = 1.0
        n_to_star = int(torch.isin(regular, torch.nonzero(~own).squeeze(1)).sum())
        hit[w_star] = n_to_star * q
        return float(hit[victim_ids].mean())
    rows = candidates.clone()
    rows[kept] = -1
    sizes = (rows >= 0).sum(1)
    empty = sizes == 0
    rows[empty, 0] = torch.nonzero(empty).squeeze(1)  # released as itself
    sizes = sizes.clamp_min(1)
    w = torch.arange(vocab).unsqueeze(1).expand_as(rows)
    valid = rows >= 0
    m, w = rows[valid], w[valid]
    q = 1.0 / sizes.double()[w]
    score = prior[w] * q
    order = torch.argsort(score, stable=True)  # ascending: the largest score per m is written last
    guess = torch.full((vocab,), -1, dtype=torch.long)
    guess[m[order]] = w[order]
    hit = torch.zeros(vocab, dtype=torch.double)
    hit.index_add_(0, w, q * (guess[m] == w).double())
    return float(hit[victim_ids].mean())


def _real_ids(split, texts, max_length: int) -> torch.Tensor:
    enc = split.tokenize(list(texts), max_length)
    return enc["input_ids"][real_token_mask(enc["input_ids"], enc["attention_mask"], split.special_ids)]


def _variant_key(fingerprint: str, variant: dict) -> str:
    return hashlib.sha256(json.dumps([fingerprint, variant], sort_keys=True).encode()).hexdigest()[:16]


def build_variant(variant: dict, ctx, settings):
    """The device-side defence for ``variant``, with importance from the device's own training part."""
    train = ctx.train
    if variant["mode"] in ("none", "privtune"):  # exactly as the sweep builds them
        options = RunConfig(defense=variant["mode"], seed=ctx.seed, max_length=settings.max_length).defense_options()
        return device_defense(variant["mode"], ctx.split, epsilon=EPSILON, texts=train["text"], labels=train["label"],
                              task=ctx.ds.task, max_length=settings.max_length, seed=ctx.seed, **options)
    ids = [ctx.split.tokenizer(t, truncation=True, max_length=settings.max_length)["input_ids"] for t in train["text"]]
    importance = {"sequences": ids, "labels": list(train["label"]), "task": ctx.ds.task}
    return SubstitutionDefense(ctx.split, EPSILON, seed=ctx.seed, mode=variant["mode"], hops=variant["hops"],
                               keep=variant["keep"], alpha=variant["alpha"], importance=importance,
                               n_hops=max(2, variant["hops"]))


def run(out: Path, variants=DEFAULT_VARIANTS, *, settings=None, seed: int = 0, progress: bool = True) -> list[dict]:
    parsed = [parse_variant(v) for v in variants]
    settings = settings or full_settings(**HEADLINE_COMMON)
    settings.validate()
    out = Path(out)
    fp = settings.fingerprint(DATASET, seed)
    rows: list[dict] = []
    todo = []
    for v in parsed:
        path = out / "points" / f"{v['tag'].replace(':', '_')}__s{seed}.json"
        stored = _load_point(path, _variant_key(fp, v))
        if stored is None:
            todo.append((v, path))
        else:
            rows += stored
    if todo:
        ctx = dataset_context(DATASET, seed, settings)
        split = ctx.split
        aux_ids = _real_ids(split, ctx.inputs["aux_texts"], settings.max_length)
        victim_ids = _real_ids(split, ctx.victim["text"], settings.max_length)
        prior = torch.bincount(aux_ids, minlength=split.vocab_size).double() + 1e-3
        prior /= prior.sum()
        for v, path in tqdm(todo, desc="substitution variants", unit="variant", disable=not progress):
            defense = build_variant(v, ctx, settings)
            ceiling = None
            if v["mode"] in ("subst-ring", "subst-uniform"):
                cand = None if v["mode"] == "subst-uniform" else defense.candidates
                ceiling = substitution_ceiling(cand, prior, victim_ids, defense.kept(), defense.regular_ids)
            got = run_point(v["tag"], None if v["mode"] == "none" else EPSILON, ctx, settings, defense=defense)
            share = None
            if isinstance(defense, SubstitutionDefense):
                enc = split.tokenize(list(ctx.victim["text"]), settings.max_length)
                share = defense.substituted_share(enc["input_ids"], enc["attention_mask"])
            got = [{**r, "variant": v["tag"], "keep": v.get("keep", 0.0), "ceiling": ceiling,
                    "privacy_substituted_share": share} for r in got]
            _atomic_write(path, json.dumps({"fingerprint": _variant_key(fp, v), "variant": v, "rows": got}, indent=1))
            rows += got
    order = {parse_variant(v)["tag"]: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: order.get(r["variant"], len(order)))
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out)
    return rows


def table(rows: list[dict], protocol: str = "adaptive") -> str:
    rows = [r for r in rows if r.get("protocol", protocol) == protocol]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    base = next((r["utility"] for r in rows if r["variant"] == "none"), None)
    head = (f"{protocol} attacker\n{'variant':<24} {'subst':>5} {'acc':>6} {'drop':>7} "
            + " ".join(f"{a:>13}" for a in attacks) + f" {'ceiling':>7}")
    lines = [head]
    for tag in dict.fromkeys(r["variant"] for r in rows):
        mine = {r["attack"]: r for r in rows if r["variant"] == tag}
        r0 = next(iter(mine.values()))
        share = r0.get("privacy_substituted_share")
        drop = "-" if base is None else f"{(base - r0['utility']) / base * 100:+.1f}%"
        ceiling = "-" if r0.get("ceiling") is None else f"{r0['ceiling']:.3f}"
        lines.append(f"{tag:<24} {'-' if share is None else f'{share:.2f}':>5} {r0['utility']:>6.3f} {drop:>7} "
                     + " ".join(f"{mine[a]['asr']:>13.3f}" if a in mine else f"{'-':>13}" for a in attacks) + f" {ceiling:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="token-substitution variants against the six attacks (Rotten Tomatoes)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", help=f"comma-separated mode[:hops[:keep[:alpha]]]; default: {','.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = DEFAULT_VARIANTS if args.variants is None else tuple(v for v in args.variants.split(",") if v.strip())
    if not variants:
        raise ValueError(f"variants={args.variants!r} is empty; accepted: comma-separated mode[:hops[:keep[:alpha]]]")
    t0 = time.perf_counter()
    rows = run(Path(args.out), variants, seed=args.seed)
    print(table(rows, "adaptive"))
    print(table(rows, "static"))
    print(f"{time.perf_counter() - t0:.1f} s; written {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
