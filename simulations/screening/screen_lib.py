"""Screening helpers on cached bottom outputs (exploration only)."""
import math, os, time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from privtune_flwr.attacks import run_attack
from privtune_flwr.attacks.base import Released
from privtune_flwr.mechanism.subspace import closed_form_basis  # noqa: F401 - the basis screen's lda-pca

def pad(rows, ids, labels=None, attrs=None):
    n = len(rows); T = max(len(r) for r in rows); d = rows[0].shape[-1]
    H = torch.zeros(n, T, d); I = torch.zeros(n, T, dtype=torch.long); M = torch.zeros(n, T, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, ids)):
        H[i, :len(r)] = r; I[i, :len(r)] = t; M[i, :len(r)] = 1
    return H, I, M

def released(rows, ids, attrs=None):
    H, I, M = pad(rows, ids)
    return Released(H, M, I, attrs or {})

SPECIAL = (0, 100, 101, 102, 103)

class TinyReader(nn.Module):
    """k-dim token features -> 1-layer attention reader -> label (device-side fit proxy)."""
    def __init__(self, k, classes, width=64):
        super().__init__()
        self.inp = nn.Linear(k, width); self.pos = nn.Embedding(64, width)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, 0.1, batch_first=True)
        self.out = nn.Linear(width, classes)
    def forward(self, f, mask):
        x = self.inp(f) + self.pos(torch.arange(f.shape[1]))[None]
        x = self.layer(x, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).float()
        return self.out((x * m).sum(1) / m.sum(1))

def cache_path(m):
    """Where ``cache m`` keeps the split-``m`` bottom outputs: ``outputs/screening``, or the folder
    ``$PRIVTUNE_SCREEN_CACHE`` names (the tests' small caches)."""
    return Path(os.environ.get("PRIVTUNE_SCREEN_CACHE", "outputs/screening")) / f"cache_m{m}.pt"

def load_cache(m):
    """(split, train, val, victim, aux, special means) of the bottom outputs cached by ``cache m``."""
    from privtune_flwr.models import load_split
    C = torch.load(cache_path(m))
    split = load_split("minilm", m, "classification", 2, seed=0)
    return split, C["train"], C["val"], C["victim"], C["aux"], special_means_of(C["train"]["rows"], C["train"]["ids"])

def fit_subspace(train_rows, train_ids, labels, k, *, epochs=4, lr=3e-3, seed=0):
    """The prototype of label-subspace's reader fit: an orthonormal [d, k] basis trained with a small
    reader of the projected tokens; returns (centre, basis, reader, scale)."""
    torch.manual_seed(seed)
    H, I, M = pad(train_rows, train_ids)
    real = M.bool() & ~torch.isin(I, torch.tensor(SPECIAL))
    c = H[real].mean(0)
    sd = H[real].std(0).mean()
    W = nn.Parameter(torch.randn(H.shape[-1], k) / math.sqrt(H.shape[-1]))
    reader = TinyReader(k, int(labels.max()) + 1)
    params = [W] + list(reader.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    n = len(H); g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 64):
            b = perm[s:s+64]
            Q, _ = torch.linalg.qr(W)
            f = ((H[b] - c) @ Q) * real[b].unsqueeze(-1)
            loss = F.cross_entropy(reader(f / sd, M[b]), labels[b])
            opt.zero_grad(); loss.backward(); opt.step()
    Q, _ = torch.linalg.qr(W.detach())
    return c, Q, reader, sd

def reader_accuracy(reader, c, Q, sd, rows, ids, labels):
    H, I, M = pad(rows, ids)
    real = M.bool() & ~torch.isin(I, torch.tensor(SPECIAL))
    with torch.no_grad():
        f = ((H - c) @ Q) * real.unsqueeze(-1)
        reader.eval()
        return float((reader(f / sd, M).argmax(-1) == labels).float().mean())

def dchi(n, k, eps, g):
    z = torch.randn(n, k, generator=g)
    mag = torch.distributions.Gamma(torch.full((n,), float(k)), torch.full((n,), float(eps))).sample()
    return z / z.norm(dim=-1, keepdim=True) * mag.unsqueeze(-1)

def project_rows(rows, ids, c, Q, eps=None, special_means=None, seed=0):
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    out = []
    for r, t in zip(rows, ids):
        f = (r - c) @ Q
        if eps is not None:
            f = f + dchi(len(r), Q.shape[1], eps, g)
        x = c + f @ Q.T
        sp = torch.isin(t, torch.tensor(SPECIAL))
        if special_means is not None and sp.any():
            x[sp] = torch.stack([special_means[int(tt)] for tt in t[sp]])
        out.append(x)
    return out

def special_means_of(rows, ids):
    acc = {}
    for r, t in zip(rows, ids):
        for j, tt in enumerate(t.tolist()):
            if tt in SPECIAL:
                acc.setdefault(tt, []).append(r[j])
    return {k: torch.stack(v).mean(0) for k, v in acc.items()}

def eia2(aux_rows, aux_ids, vic_rows, vic_ids, split, hidden=1024, epochs=3, vocab_cap=4000):
    return run_attack("eia-mlp", split, released(aux_rows, aux_ids), released(vic_rows, vic_ids),
                      hidden=hidden, epochs=epochs, vocab_cap=vocab_cap)

def top_utility(split, train_rows, train_labels, val_rows, val_labels, steps=600, bs=16, lr=1e-3, seed=0, eval_every=200):
    from privtune_flwr.cloud import CloudSide
    from simulations.training import bucketed_batches
    init = split.trainable_state()
    cloud = CloudSide(split, learning_rate=lr, batch_size=bs, seed=seed)
    lengths = torch.tensor([len(r) for r in train_rows]); g = torch.Generator().manual_seed(seed)
    hist = []; step = 0
    def evaluate():
        split.top.eval(); correct = 0
        order = torch.argsort(torch.tensor([len(r) for r in val_rows]))
        with torch.no_grad():
            for s in range(0, len(order), 64):
                idx = order[s:s+64]
                H, _, M = pad([val_rows[i] for i in idx], [torch.zeros(len(val_rows[i]), dtype=torch.long) for i in idx])
                correct += int((split.top(H, M).argmax(-1) == val_labels[idx]).sum())
        return correct / len(val_rows)
    while step < steps:
        for b in bucketed_batches(lengths, bs, g):
            H, _, M = pad([train_rows[i] for i in b], [torch.zeros(len(train_rows[i]), dtype=torch.long) for i in b])
            cloud.train_on(H, M, train_labels[b]); step += 1
            if step % eval_every == 0: hist.append((step, evaluate()))
            if step >= steps: break
    split.load_trainable_state(init)
    return hist

