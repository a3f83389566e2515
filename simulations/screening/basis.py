"""Who chooses the projection: how much a rank-k projection of the bottom's tokens leaks, by how
its basis was picked (docs/results.md, "Who chooses the basis").

    python -m simulations.screening basis SPLIT RANKS BASES     # e.g. basis 3 1,2,4,8 label,inverter,pca,random

At split 3 (cached by ``cache 3``), no noise on the projection. Bases, each orthonormal [d, k]:
``label``: fitted on the device's labelled training sentences with a small reader (the
prototype of ``label-subspace``); ``random``: a Gaussian matrix orthonormalised (seed 0);
``pca``: the top-k principal directions of the auxiliary tokens; ``inverter``: fitted on the
auxiliary tokens jointly with a token inverter to maximise token recovery (what a cloud that could
choose the basis would pick); ``lda-pca``: fitted in closed form on the training sentences
(``label-subspace``'s closed-form basis, ``privtune_flwr.mechanism.subspace.closed_form_basis``: the
tokens' Fisher direction for the label, then for k = 2 their first principal direction). Per basis: the validation accuracy of a reader trained on the
projected training sentences (the label kept) and the adaptive EIA-2 top-1 recovery of a fresh
inverter trained on auxiliary text projected the same way, scored on the victim sentences (token
identity kept). One JSON line each."""
import json
import math
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from simulations.screening.screen_lib import (closed_form_basis, eia2, fit_subspace, load_cache, pad, project_rows,
                                              reader_accuracy, SPECIAL, TinyReader)

BASES = ("label", "random", "pca", "inverter", "lda-pca")


def real_tokens(rows, ids):
    H, I, M = pad(rows, ids)
    return H, I, M, M.bool() & ~torch.isin(I, torch.tensor(SPECIAL))


def reader_on(Q, c, sd, rows, ids, labels, *, epochs=4, lr=3e-3, seed=0):
    """A TinyReader trained on the projected training sentences, basis held fixed."""
    torch.manual_seed(seed)
    H, I, M, real = real_tokens(rows, ids)
    reader = TinyReader(Q.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(reader.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    reader.train()
    for _ in range(epochs):
        perm = torch.randperm(len(H), generator=g)
        for s in range(0, len(H), 64):
            b = perm[s:s + 64]
            f = ((H[b] - c) @ Q) * real[b].unsqueeze(-1)
            loss = F.cross_entropy(reader(f / sd, M[b]), labels[b])
            opt.zero_grad(); loss.backward(); opt.step()
    return reader


def inverter_basis(rows, ids, k, *, epochs=4, lr=3e-3, seed=0, vocab_cap=2000):
    """The basis a token inverter would choose: W and an MLP inverter trained together to recover
    the (``vocab_cap`` most frequent) token ids from the k projected coordinates."""
    torch.manual_seed(seed)
    H, I, M, real = real_tokens(rows, ids)
    X, T = H[real], I[real]
    c = X.mean(0); sd = X.std(0).mean()
    uniq, cnt = T.unique(return_counts=True)
    keep = uniq[cnt.argsort(descending=True)[:vocab_cap]]
    local = torch.full((30522,), -1); local[keep] = torch.arange(len(keep))
    ok = local[T] >= 0
    X, Y = X[ok], local[T[ok]]
    W = nn.Parameter(torch.randn(X.shape[1], k) / math.sqrt(X.shape[1]))
    net = nn.Sequential(nn.Linear(k, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, len(keep)))
    opt = torch.optim.Adam([W] + list(net.parameters()), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), 256):
            b = perm[s:s + 256]
            Q, _ = torch.linalg.qr(W)
            loss = F.cross_entropy(net(((X[b] - c) @ Q) / sd), Y[b])
            opt.zero_grad(); loss.backward(); opt.step()
    return torch.linalg.qr(W.detach())[0]


def main(argv):
    """One JSON line per (rank, basis); returns the rows."""
    M = int(argv[0])
    RANKS = [int(x) for x in argv[1].split(",")]
    MODES = argv[2].split(",")
    bad = [m for m in MODES if m not in BASES]
    if bad:
        raise SystemExit(f"basis {bad[0]!r}: accepted: {', '.join(BASES)}")
    torch.set_num_threads(1)
    rows = []
    split, tr, va, vi, ax, sm = load_cache(M)
    Htr, _, _, real_tr = real_tokens(tr["rows"], tr["ids"])
    c = Htr[real_tr].mean(0); sd = Htr[real_tr].std(0).mean()
    for k in RANKS:
        for mode in MODES:
            t = time.time()
            if mode == "label":
                c_fit, Q, _, _ = fit_subspace(tr["rows"], tr["ids"], tr["labels"], k)
            elif mode == "random":
                Q, _ = torch.linalg.qr(torch.randn(split.hidden_size, k, generator=torch.Generator().manual_seed(0)))
            elif mode == "pca":
                Hax, _, _, real_ax = real_tokens(ax["rows"], ax["ids"])
                X = Hax[real_ax]
                Q = torch.linalg.svd(X - X.mean(0), full_matrices=False)[2][:k].T.contiguous()
            elif mode == "inverter":
                Q = inverter_basis(ax["rows"], ax["ids"], k)
            elif mode == "lda-pca":
                token_class = tr["labels"].unsqueeze(1).expand(real_tr.shape)[real_tr]
                Q = closed_form_basis(Htr[real_tr], token_class, k)
            else:
                raise SystemExit(f"basis {mode!r}: accepted: {', '.join(BASES)}")
            reader = reader_on(Q, c, sd, tr["rows"], tr["ids"], tr["labels"])
            acc = reader_accuracy(reader, c, Q, sd, va["rows"], va["ids"], va["labels"])
            fit_s = time.time() - t
            arows = project_rows(ax["rows"], ax["ids"], c, Q, None, sm)
            vrows = project_rows(vi["rows"], vi["ids"], c, Q, None, sm)
            e2 = eia2(arows, ax["ids"], vrows, vi["ids"], split)
            row = {"m": M, "k": k, "basis": mode, "reader_val_acc": acc, "eia2": e2["asr"], "blind": e2["blind_accuracy"],
                   "fit_s": fit_s, "sec": time.time() - t}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
