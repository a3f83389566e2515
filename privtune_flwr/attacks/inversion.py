"""Embedding inversion attacks (EIA-1..3): recover the tokens behind released representations."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..mechanism.anchors import build_anchors, nearest_anchor
from ..models import SplitModel
from .base import Attack, Released, Standardizer, real_token_mask, train_minibatch
from .metrics import mean_rouge_l, token_set_f1

METRICS = ("cosine", "l2")

_ANCHOR_CACHE: dict[int, tuple[nn.Module, torch.Tensor]] = {}


def context_free_anchors(split: SplitModel) -> torch.Tensor:
    """Anchor table ``[V, d]`` (spec §2.2), built by the attacker from the bottom it knows.

    Uses the mechanism's builder, without its k-NN graph and rings (the attacker needs only the
    anchors); cached per bottom module for the process (MiniLM layer 1: ~5 s on one core).
    """
    key = id(split.bottom)
    cached = _ANCHOR_CACHE.get(key)
    if cached is not None and cached[0] is split.bottom:
        return cached[1]
    table = build_anchors(split)
    _ANCHOR_CACHE[key] = (split.bottom, table)
    return table


class KnnInversion(Attack):
    """EIA-1: decode each released token as its nearest context-free anchor (cosine and L2).

    Needs no training; ``fit`` only records the anchor table. ASR = top-1 token recovery over real
    non-special victim tokens, the stronger of the two metrics (both are reported).
    """

    name = "eia-knn"
    defaults = {"anchors": None}

    def fit(self, aux: Released) -> KnnInversion:
        anchors = self.options["anchors"]
        self.anchors = context_free_anchors(self.split) if anchors is None else anchors.float()
        if tuple(self.anchors.shape) != (self.split.vocab_size, self.split.hidden_size):
            raise ValueError(f"anchors have shape {tuple(self.anchors.shape)}; expected "
                             f"{(self.split.vocab_size, self.split.hidden_size)}")
        self.fitted = True
        return self

    def score(self, victim: Released) -> dict:
        self._require_fitted()
        keep = real_token_mask(victim, self.special_ids)
        points, truth = victim.hidden[keep], victim.input_ids[keep]
        acc = {m: float((nearest_anchor(points, self.anchors, m) == truth).float().mean()) for m in METRICS}
        best = max(METRICS, key=lambda m: acc[m])
        return {"asr": acc[best], "metric": "top-1 token recovery", "best_metric": best,
                "asr_cosine": acc["cosine"], "asr_l2": acc["l2"], "tokens": int(keep.sum())}


class _Vocabulary:
    """The attacker's output vocabulary: tokens seen in the auxiliary data, at most ``cap`` of them.

    A full 30k-way softmax costs ~60M parameters per inverter; restricting to tokens the attacker
    can ever learn loses nothing it could have predicted (unseen tokens have no training signal).
    Victim tokens outside it count as misses when scoring.
    """

    def __init__(self, tokens: torch.Tensor, vocab_size: int, cap: int):
        ids, counts = tokens.unique(return_counts=True)
        if ids.numel() == 0:
            raise ValueError("auxiliary data holds no real non-special token to learn from")
        ids = ids[torch.argsort(counts, descending=True, stable=True)[:cap]]
        self.ids = ids
        self.local = torch.full((vocab_size,), -1, dtype=torch.long)
        self.local[ids] = torch.arange(len(ids))

    def __len__(self) -> int:
        return len(self.ids)


class MlpInversion(Attack):
    """EIA-2: per-token MLP ``d → hidden → V_aux`` trained on auxiliary released tokens.

    ``V_aux`` is the auxiliary vocabulary (see ``_Vocabulary``); fixed epoch count.
    """

    name = "eia-mlp"
    defaults = {"epochs": 10, "hidden": 2048, "lr": 1e-3, "batch_size": 256, "vocab_cap": 30522}

    def fit(self, aux: Released) -> MlpInversion:
        torch.manual_seed(self.seed)
        keep = real_token_mask(aux, self.special_ids)
        x, tokens = aux.hidden[keep], aux.input_ids[keep]
        self.vocab = _Vocabulary(tokens, self.split.vocab_size, self.options["vocab_cap"])
        target = self.vocab.local[tokens]
        x, target = x[target >= 0], target[target >= 0]
        o = self.options
        self.model = nn.Sequential(Standardizer(x), nn.Linear(x.shape[1], o["hidden"]), nn.GELU(),
                                   nn.Linear(o["hidden"], len(self.vocab)))
        self.history = train_minibatch(self.model, (x, target), lambda m, a, b: F.cross_entropy(m(a), b),
                                       epochs=o["epochs"], batch_size=o["batch_size"], lr=o["lr"], seed=self.seed)
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, victim: Released) -> dict:
        self._require_fitted()
        self.model.eval()
        keep = real_token_mask(victim, self.special_ids)
        x, truth = victim.hidden[keep], victim.input_ids[keep]
        pred = torch.cat([self.vocab.ids[self.model(x[i:i + 4096]).argmax(-1)] for i in range(0, len(x), 4096)])
        covered = float((self.vocab.local[truth] >= 0).float().mean())
        return {"asr": float((pred == truth).float().mean()), "metric": "top-1 token accuracy",
                "blind_accuracy": float((truth == self.vocab.ids[0]).float().mean()),
                "output_vocab": len(self.vocab), "victim_token_coverage": covered, "tokens": int(keep.sum()),
                "train_loss": self.history[-1]}

    def parameters(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def blind_token_set(aux: Released, special_ids: torch.Tensor, max_size: int = 64) -> list[int]:
    """The fixed token set an attacker would guess for every sequence without looking at it.

    The ``k`` tokens found in the most auxiliary sequences, ``k`` chosen to maximise token-set F1
    on the auxiliary data itself. Its F1 on the victim (``blind_f1``) is the floor that EIA-3's
    score should be read against: frequent words are guessed right whatever the release.
    """
    keep = real_token_mask(aux, special_ids)
    seqs = [aux.input_ids[i][keep[i]].tolist() for i in range(len(aux))]
    doc_freq: dict[int, int] = {}
    for seq in seqs:
        for t in set(seq):
            doc_freq[t] = doc_freq.get(t, 0) + 1
    ranked = sorted(doc_freq, key=lambda t: (-doc_freq[t], t))[:max_size]
    if not ranked:
        return []
    best = max(range(1, len(ranked) + 1), key=lambda k: (token_set_f1([ranked[:k]] * len(seqs), seqs), -k))
    return ranked[:best]


class _SinusoidalPositions(nn.Module):
    def __init__(self, width: int, max_len: int = 4096):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
        table = torch.zeros(max_len, width)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: width // 2])
        self.register_buffer("table", table)

    def forward(self, x):
        return x + self.table[: x.shape[1]]


class _ContextNet(nn.Module):
    """Standardise → project → 2-layer bidirectional Transformer encoder → token logits.

    A Transformer (not a BiLSTM) because its key-padding mask handles right *and* left padding
    (decoders pad on the left) without packing.
    """

    def __init__(self, aux_points: torch.Tensor, width: int, layers: int, heads: int, vocab: int, dropout: float):
        super().__init__()
        self.norm = Standardizer(aux_points)
        self.proj = nn.Linear(aux_points.shape[1], width)
        self.pos = _SinusoidalPositions(width)
        block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab))

    def forward(self, hidden, attention_mask):
        x = self.pos(self.proj(self.norm(hidden)))
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.head(x)


class ContextInversion(Attack):
    """EIA-3: a small bidirectional sequence model over the whole released sequence.

    ASR = token-set F1 (per sequence, predicted vs true set of real non-special tokens, averaged);
    ROUGE-L F1 of the predicted token sequence is reported too.
    """

    name = "eia-context"
    defaults = {"epochs": 15, "width": 256, "layers": 2, "heads": 4, "dropout": 0.1, "lr": 1e-3,
                "batch_size": 16, "vocab_cap": 30522}

    def fit(self, aux: Released) -> ContextInversion:
        torch.manual_seed(self.seed)
        keep = real_token_mask(aux, self.special_ids)
        self.vocab = _Vocabulary(aux.input_ids[keep], self.split.vocab_size, self.options["vocab_cap"])
        # Positions the model is not scored on (padding, special, out-of-vocabulary) are ignored.
        target = torch.where(keep, self.vocab.local[aux.input_ids], torch.full_like(aux.input_ids, -1))
        o = self.options
        self.model = _ContextNet(aux.hidden[keep], o["width"], o["layers"], o["heads"], len(self.vocab), o["dropout"])

        def loss(model, hidden, mask, tgt):
            logits = model(hidden, mask)
            return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-1)

        self.history = train_minibatch(self.model, (aux.hidden, aux.attention_mask, target), loss,
                                       epochs=o["epochs"], batch_size=o["batch_size"], lr=o["lr"], seed=self.seed)
        self.blind = blind_token_set(aux, self.special_ids)
        self.fitted = True
        return self

    @torch.no_grad()
    def predict(self, victim: Released) -> torch.Tensor:
        """Predicted token ids ``[N, T]`` (vocabulary ids) from the released sequences only."""
        self._require_fitted()
        self.model.eval()
        out = [self.model(victim.hidden[i:i + 64], victim.attention_mask[i:i + 64]).argmax(-1)
               for i in range(0, len(victim), 64)]
        return self.vocab.ids[torch.cat(out)]

    def score(self, victim: Released) -> dict:
        pred = self.predict(victim)
        keep = real_token_mask(victim, self.special_ids)
        pred_seqs = [pred[i][keep[i]].tolist() for i in range(len(victim))]
        true_seqs = [victim.input_ids[i][keep[i]].tolist() for i in range(len(victim))]
        return {"asr": token_set_f1(pred_seqs, true_seqs), "metric": "token-set F1",
                "blind_f1": token_set_f1([self.blind] * len(true_seqs), true_seqs), "blind_tokens": len(self.blind),
                "rouge_l": mean_rouge_l(pred_seqs, true_seqs),
                "token_accuracy": float((pred[keep] == victim.input_ids[keep]).float().mean()),
                "output_vocab": len(self.vocab), "train_loss": self.history[-1]}

    def parameters(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
