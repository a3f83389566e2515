"""Devices fit their label maps apart: does the cloud's top see one input, or one per device?

    python -m simulations.screening device-agreement [SPLIT] [DEVICES] [PARTITIONER] [ALPHA] [TEST] [TRAIN] [VARIANT]

On the cached Rotten Tomatoes sentences of split ``SPLIT`` (default 3; run
``python -m simulations.screening cache SPLIT`` first), the training sentences are shared out
among ``DEVICES`` devices (default 10) by the app's own partitioner (``data.partition``:
``iid``, the default, or ``dirichlet`` with ``ALPHA``, default 0.5). For ``label-subspace`` and
``label-obfuscator`` (rank 2, as ``make run``), one map is fitted on all the training sentences
(one device, as in the sweep) and one per device on its own share (as in the Flower app). Then, on
the first ``TEST`` test sentences (default 500; ``TRAIN`` > 0 keeps only that many training
sentences, for a quick check), each released at ε = 64 with seeded noise.

``VARIANT`` (default: none) fits ``label-subspace`` alone, another way, and adds ``_VARIANT`` to
the output's name:

* ``stepsN``: every map's reader trained for at least ``N`` optimiser steps (more epochs on a
  small share; the one map's 4 epochs over 6,910 sentences are 432 steps);
* ``lda``: ``label-subspace``'s closed-form fit (``fit_subspace(..., method="closed-form")``) at
  rank 1: the Fisher direction of the tokens (each labelled with its sentence's class, the
  within-class scatter shrunk halfway to its mean eigenvalue);
* ``lda-pca``: the same fit at rank 2: that direction and the tokens' first principal direction.

What the screen reports:

* ``feature_corr``: per direction, the correlation between a device's features of a token and the
  one-device map's (mean over devices): how far the data-fixed frame makes them the same numbers;
* ``release_gap``: ``E||r_dev(h) - r_one(h)||^2 / E||r_one(h) - mean||^2`` over regular tokens,
  where ``r`` is the released vector the top reads; 0 means the device releases what one map
  would, 1 means it differs by as much as the releases themselves spread;
* ``pair_gap``: the same between two devices (mean over pairs);
* ``reader_one`` / ``reader_many``: a contextual reader of the released vectors (one
  self-attention layer, the label fits' reader on the full hidden size) trained on the training
  sentences and scored on the test sentences, once through the one map, once with each device's
  share through its own map and test sentence ``i`` released by the ``(i mod n)``-th of the ``n``
  devices that fitted a map;
  ``reader_cross``: that second reader scored with every test sentence released by each single
  device in turn (min and max over devices; ``reader_cross`` per device).

A device whose share holds a single class cannot fit either map (the fit refuses it, and in the
Flower app that device's replies fail with the same error): it is left out, named in
``single_class_devices``, and its sentences are not in ``reader_many``'s training.

Prints one JSON line per defence and writes them to
``device_agreement_s{SPLIT}_{DEVICES}{PARTITIONER}.json`` beside the cache (``outputs/screening``). A screen (one seed,
one small reader), not the top at convergence.
"""
import json
import sys
import time

import datasets
import torch
from torch.nn import functional as F

from privtune_flwr import data
from privtune_flwr.defenses import build_defense
from privtune_flwr.mechanism.obfuscator import fit_obfuscator
from privtune_flwr.mechanism.subspace import _pad, _Reader, fit_subspace
from privtune_flwr.models import load_split
from simulations.screening.screen_lib import cache_path

# the arguments' defaults (main sets them from the command line)
SPLIT, DEVICES, PARTITIONER, ALPHA, TEST, TRAIN, VARIANT = 3, 10, "iid", 0.5, 500, 0, ""
RANK, EPSILON, SEED = 2, 64.0, 0


def closed_form_subspace(rows, ids, labels, *, rank, special_ids, seed=0, **_):
    """``lda`` / ``lda-pca``: ``label-subspace``'s closed-form fit at rank 1 / 2."""
    return fit_subspace(rows, ids, labels, rank=rank, special_ids=special_ids, method="closed-form")


def fits_for(variant: str):
    """The maps the screen fits for ``variant``, and their rank."""
    if variant.startswith("steps") and variant[5:].isdigit():
        return {"label-subspace": (fit_subspace, "subspace")}, 2
    if variant in ("lda", "lda-pca"):
        return {"label-subspace": (closed_form_subspace, "subspace")}, 1 if variant == "lda" else 2
    if variant:
        raise SystemExit(f"VARIANT={variant!r}: accepted: stepsN, lda, lda-pca")
    return {"label-subspace": (fit_subspace, "subspace"), "label-obfuscator": (fit_obfuscator, "obfuscator")}, 2


def release(defense, rows, ids):
    """The released vectors ``[B, T, d]`` of cached rows through ``defense``, with their mask."""
    hidden, tokens, mask = _pad(rows, ids)
    return defense(hidden, tokens, mask), mask, tokens


def train_reader(batches, classes: int, d: int, max_len: int, epochs: int = 4) -> _Reader:
    """A contextual reader of released vectors; ``batches()`` yields ``(released, mask, labels)``."""
    torch.manual_seed(SEED)
    reader = _Reader(d, classes, 64, max_len)
    optimiser = torch.optim.Adam(reader.parameters(), lr=1e-3)
    reader.train()
    for _ in range(epochs):
        for x, mask, y in batches():
            loss = F.cross_entropy(reader(x, mask), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return reader.eval()


def accuracy(reader: _Reader, x, mask, y) -> float:
    with torch.no_grad():
        return float((reader(x, mask).argmax(-1) == y).float().mean())


def main(argv) -> list[dict]:
    """One JSON line per defence; returns the rows (also written beside the cache)."""
    global SPLIT, DEVICES, PARTITIONER, ALPHA, TEST, TRAIN, VARIANT, RANK
    kinds = (int, int, str, float, int, int, str)
    values = [kind(a) for kind, a in zip(kinds, argv)]
    SPLIT, DEVICES, PARTITIONER, ALPHA, TEST, TRAIN, VARIANT = values + [SPLIT, DEVICES, PARTITIONER, ALPHA, TEST, TRAIN,
                                                                         VARIANT][len(values):]
    fits, RANK = fits_for(VARIANT)
    torch.set_num_threads(1)
    cache = torch.load(cache_path(SPLIT))
    train, test = cache["train"], cache["test"]
    if TRAIN:
        train = {key: value[:TRAIN] for key, value in train.items()}
    split = load_split("minilm", SPLIT, "classification", 2, seed=SEED)
    special = split.special_ids
    labels = train["labels"]
    table = datasets.Dataset.from_dict({"row": list(range(len(labels))), "label": labels.tolist()})
    shares = [data.partition(table, DEVICES, i, partitioner=PARTITIONER, alpha=ALPHA, seed=SEED)["row"]
              for i in range(DEVICES)]
    single = [i for i, share in enumerate(shares) if labels[share].unique().numel() < 2]
    fitted_devices = [i for i in range(DEVICES) if i not in single]
    t_rows, t_ids, t_y = test["rows"][:TEST], test["ids"][:TEST], test["labels"][:TEST]
    d = t_rows[0].shape[-1]
    max_len = max(len(r) for r in train["rows"] + t_rows)
    owner = torch.arange(len(t_rows)) % len(fitted_devices)  # an index into the fitted devices
    out_rows = []
    for name, (fit, option) in fits.items():
        t0 = time.time()

        def build(index):
            rows = [train["rows"][i] for i in index]
            ids = [train["ids"][i] for i in index]
            extra = {}
            if VARIANT.startswith("steps"):  # enough epochs for the floor on the steps, never fewer than 4
                extra["epochs"] = max(4, -(-int(VARIANT[5:]) // -(-len(index) // 64)))
            fitted = fit(rows, ids, labels[index].tolist(), rank=RANK, special_ids=special, seed=SEED, **extra)
            return build_defense(name, epsilon=EPSILON, split=split, seed=SEED, subspace_rank=RANK, **{option: fitted})

        one = build(list(range(len(labels))))
        many = [build(shares[i]) for i in fitted_devices]
        fit_s = time.time() - t0
        r_one, mask, tokens = release(one, t_rows, t_ids)
        regular = mask.bool() & ~torch.isin(tokens, special)
        per_device = [release(dev, t_rows, t_ids)[0] for dev in many]
        ref = r_one[regular]
        spread = float(((ref - ref.mean(0)) ** 2).sum(-1).mean())
        gaps = [float(((r[regular] - ref) ** 2).sum(-1).mean()) / spread for r in per_device]
        n = len(many)
        pairs = [float(((per_device[a][regular] - per_device[b][regular]) ** 2).sum(-1).mean()) / spread
                 for a in range(n) for b in range(a + 1, n)]
        lift = one.basis if name == "label-subspace" else one.lift
        f_one = (ref - one.center) @ lift
        corrs = []
        for dev, r in zip(many, per_device):
            basis = dev.basis if name == "label-subspace" else dev.lift
            f_dev = (r[regular] - dev.center) @ basis
            corrs.append([float(torch.corrcoef(torch.stack([f_dev[:, j], f_one[:, j]]))[0, 1]) for j in range(RANK)])
        mixed = torch.stack([per_device[int(owner[i])][i] for i in range(len(t_rows))])

        def batches_through(assign):
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED)).tolist()
            for start in range(0, len(order), 64):
                b = order[start:start + 64]
                rows = [train["rows"][i] for i in b]
                ids = [train["ids"][i] for i in b]
                hidden, toks, m = _pad(rows, ids)
                x = torch.zeros_like(hidden)
                released = torch.zeros(len(b), dtype=torch.bool)
                for dev, where in assign(b):
                    x[where] = dev(hidden[where], toks[where], m[where])
                    released[where] = True
                if released.any():
                    yield x[released], m[released], labels[b][released]

        device_of = torch.full((len(labels),), -1, dtype=torch.long)  # -1: a device that fitted nothing
        for position, i in enumerate(fitted_devices):
            device_of[shares[i]] = position
        reader_one = train_reader(lambda: batches_through(lambda b: [(one, torch.arange(len(b)))]), 2, d, max_len)

        def own(b):
            who = device_of[b]
            return [(many[i], (who == i).nonzero().flatten()) for i in who.unique().tolist() if i >= 0]

        reader_many = train_reader(lambda: batches_through(own), 2, d, max_len)
        cross = [accuracy(reader_many, r, mask, t_y) for r in per_device]
        row = {"defense": name, "split": SPLIT, "devices": DEVICES, "single_class_devices": single,
               "partitioner": PARTITIONER, "variant": VARIANT or "reader", "rank": RANK,
               "alpha": ALPHA if PARTITIONER == "dirichlet" else None, "test_sentences": len(t_rows),
               "share_sizes": [len(s) for s in shares],
               "share_positive": [round(float(labels[s].float().mean()), 3) for s in shares],
               "feature_corr": [sum(c[j] for c in corrs) / n for j in range(RANK)],
               "feature_corr_min": [min(c[j] for c in corrs) for j in range(RANK)],
               "release_gap": sum(gaps) / n, "release_gap_max": max(gaps),
               "pair_gap": sum(pairs) / len(pairs),
               "reader_one": accuracy(reader_one, r_one, mask, t_y),
               "reader_many": accuracy(reader_many, mixed, mask, t_y),
               "reader_cross_min": min(cross), "reader_cross_max": max(cross),
               "reader_cross": dict(zip(fitted_devices, cross)),
               "fit_seconds": fit_s, "seconds": time.time() - t0}
        print(json.dumps(row), flush=True)
        out_rows.append(row)
    tag = f"_{VARIANT}" if VARIANT else ""
    path = cache_path(SPLIT).parent / f"device_agreement_s{SPLIT}_{DEVICES}{PARTITIONER}{tag}.json"
    path.write_text(json.dumps(out_rows, indent=1))
    print("written", path)
    return out_rows


if __name__ == "__main__":
    main(sys.argv[1:])
