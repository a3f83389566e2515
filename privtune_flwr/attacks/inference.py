"""Attribute inference attacks (AIA-1..3) from the pooled released representation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Attack, Released, Standardizer, train_minibatch
from .keywords import keyword_presence, keyword_token_ids
from .metrics import balanced_accuracy, best_threshold, recall_precision_at


def _pooled(split, released: Released) -> torch.Tensor:
    """``[N, d]``: the model's own pooling of the released sequence (what the cloud can compute)."""
    return split.pool(released.hidden, released.attention_mask).float()


class AttributeInference(Attack):
    """AIA-1: MLP on the pooled representation predicting a per-sequence class attribute.

    Classes are those of the auxiliary data; ``-1`` labels are skipped. ASR = accuracy on victim
    sequences with a known label; the victim's majority-class rate is reported beside it.
    """

    name = "aia-attribute"
    defaults = {"attribute": None, "epochs": 50, "hidden": 256, "lr": 1e-3, "batch_size": 64, "weight_decay": 1e-4}

    def _labels(self, released: Released, role: str) -> torch.Tensor:
        name = self.options["attribute"]
        if name is None:
            raise ValueError("attack 'aia-attribute' needs attribute=<name of a per-sequence label>")
        if name not in released.attributes:
            raise ValueError(f"attribute={name!r} is missing from the {role} data; it has: {sorted(released.attributes)}")
        return released.attributes[name].long()

    def fit(self, aux: Released) -> AttributeInference:
        labels = self._labels(aux, "auxiliary")
        known = labels >= 0
        x, y = _pooled(self.split, aux)[known], labels[known]
        if y.unique().numel() < 2:
            raise ValueError(f"attribute={self.options['attribute']!r} has {y.unique().numel()} class(es) in the auxiliary data; need >= 2")
        torch.manual_seed(self.seed)
        o = self.options
        self.num_classes = int(y.max()) + 1
        self.model = nn.Sequential(Standardizer(x), nn.Linear(x.shape[1], o["hidden"]), nn.GELU(),
                                   nn.Linear(o["hidden"], self.num_classes))
        self.history = train_minibatch(self.model, (x, y), lambda m, a, b: F.cross_entropy(m(a), b), epochs=o["epochs"],
                                       batch_size=o["batch_size"], lr=o["lr"], seed=self.seed, weight_decay=o["weight_decay"])
        self.fitted = True
        return self

    @torch.no_grad()
    def predict(self, victim: Released) -> torch.Tensor:
        self._require_fitted()
        return self.model(_pooled(self.split, victim)).argmax(-1)

    def score(self, victim: Released) -> dict:
        pred = self.predict(victim)
        labels = self._labels(victim, "victim")
        known = labels >= 0
        if not known.any():
            raise ValueError(f"attribute={self.options['attribute']!r} has no known (>= 0) label in the victim data")
        y = labels[known]
        majority = float(torch.bincount(y).max()) / len(y)
        return {"asr": float((pred[known] == y).float().mean()), "metric": "accuracy", "majority_rate": majority,
                "attribute": self.options["attribute"], "sequences": int(known.sum())}

    def parameters(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class _KeywordAttack(Attack):
    """Shared keyword handling: single-token keywords, kept when they occur in the auxiliary data."""

    def _keyword_targets(self, released: Released) -> torch.Tensor:
        return keyword_presence(released.input_ids, released.attention_mask, self.keyword_ids).float()

    def _setup_keywords(self, aux: Released) -> torch.Tensor:
        words = self.options["keywords"]
        if not words:
            raise ValueError(f"attack {self.name!r} needs keywords=[...] (a non-empty list of words); got {words!r}")
        kept, ids, self.dropped = keyword_token_ids(self.split.tokenizer, words)
        if not kept:
            raise ValueError(f"none of keywords={list(words)!r} is a single token of the tokenizer")
        self.words, self.keyword_ids = kept, ids
        targets = self._keyword_targets(aux)
        # A keyword the auxiliary data never shows (or always shows) gives nothing to learn.
        usable = (targets.sum(0) > 0) & (targets.sum(0) < len(aux))
        if not usable.any():
            raise ValueError(f"no keyword of {kept!r} both occurs and is absent in the auxiliary data")
        self.words = [w for w, u in zip(kept, usable.tolist()) if u]
        self.keyword_ids = ids[usable]
        return targets[:, usable]


class _IndependentMlps(nn.Module):
    """``K`` independent binary MLPs ``d → hidden → 1`` run as one batched einsum (no shared weights)."""

    def __init__(self, aux_points: torch.Tensor, keywords: int, hidden: int):
        super().__init__()
        d = aux_points.shape[1]
        self.norm = Standardizer(aux_points)
        self.w1 = nn.Parameter(torch.randn(keywords, d, hidden) / d ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(keywords, hidden))
        self.w2 = nn.Parameter(torch.randn(keywords, hidden) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(keywords))

    def forward(self, x):  # [N, d] -> logits [N, K]
        h = F.gelu(torch.einsum("nd,kdh->nkh", self.norm(x), self.w1) + self.b1)
        return (h * self.w2).sum(-1) + self.b2


class KeywordInference(_KeywordAttack):
    """AIA-2 (Pan et al., S&P 2020): one binary classifier per keyword on "does it occur".

    Each classifier's loss is class-balanced (rare keywords would otherwise be predicted absent),
    and it decides at probability 0.5. ASR = mean balanced accuracy over the keywords that occur
    in both the auxiliary and the victim data (``keywords_used`` says how many).
    """

    name = "aia-keyword"
    defaults = {"keywords": None, "epochs": 100, "hidden": 64, "lr": 1e-3, "batch_size": 64, "weight_decay": 1e-4}

    def fit(self, aux: Released) -> KeywordInference:
        targets = self._setup_keywords(aux)
        x = _pooled(self.split, aux)
        torch.manual_seed(self.seed)
        o = self.options
        self.model = _IndependentMlps(x, len(self.words), o["hidden"])
        positives = targets.sum(0)
        pos_weight = (len(targets) - positives) / positives

        def loss(model, a, b):
            return F.binary_cross_entropy_with_logits(model(a), b, pos_weight=pos_weight)

        self.history = train_minibatch(self.model, (x, targets), loss, epochs=o["epochs"], batch_size=o["batch_size"],
                                       lr=o["lr"], seed=self.seed, weight_decay=o["weight_decay"])
        self.fitted = True
        return self

    @torch.no_grad()
    def predict(self, victim: Released) -> torch.Tensor:
        """``[N, K]`` probability that keyword ``k`` occurs in victim sequence ``n``."""
        self._require_fitted()
        return torch.sigmoid(self.model(_pooled(self.split, victim)))

    def score(self, victim: Released) -> dict:
        prob = self.predict(victim)
        truth = self._keyword_targets(victim)
        used = [k for k in range(len(self.words)) if 0 < truth[:, k].sum() < len(victim)]
        if not used:
            return {"asr": float("nan"), "metric": "mean balanced accuracy", "keywords_used": 0,
                    "keywords_dropped_multitoken": self.dropped}
        per = {self.words[k]: balanced_accuracy(truth[:, k], prob[:, k] >= 0.5) for k in used}
        return {"asr": sum(per.values()) / len(per), "metric": "mean balanced accuracy", "keywords_used": len(per),
                "per_keyword": per, "keywords_dropped_multitoken": self.dropped}

    def parameters(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class BagOfWordsInference(_KeywordAttack):
    """AIA-3 (multi-label classification): predict the set of sensitive words of a sequence.

    A shared MLP ``d → hidden → K`` with sigmoid outputs, trained on ``1 - holdout`` of the
    auxiliary data; the decision threshold maximises micro F1 on the held-out auxiliary slice.
    ASR = micro recall on the victim at that threshold; micro precision is reported too, and
    ``blind_recall``: the recall of a guess that ignores the release (each word scored by its
    auxiliary frequency, thresholded the same way).
    """

    name = "aia-bow"
    defaults = {"keywords": None, "epochs": 100, "hidden": 256, "lr": 1e-3, "batch_size": 64, "weight_decay": 1e-4,
                "holdout": 0.2}

    def fit(self, aux: Released) -> BagOfWordsInference:
        targets = self._setup_keywords(aux)
        x = _pooled(self.split, aux)
        o = self.options
        if not 0 < o["holdout"] < 1:
            raise ValueError(f"holdout={o['holdout']!r} must be in (0, 1)")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_hold = max(1, int(round(o["holdout"] * len(x))))
        if n_hold >= len(x):
            raise ValueError(f"auxiliary data of {len(x)} sequences is too small to hold out {o['holdout']!r} of it")
        hold, train = order[:n_hold], order[n_hold:]
        torch.manual_seed(self.seed)
        self.model = nn.Sequential(Standardizer(x[train]), nn.Linear(x.shape[1], o["hidden"]), nn.GELU(),
                                   nn.Linear(o["hidden"], len(self.words)))
        self.history = train_minibatch(self.model, (x[train], targets[train]),
                                       lambda m, a, b: F.binary_cross_entropy_with_logits(m(a), b), epochs=o["epochs"],
                                       batch_size=o["batch_size"], lr=o["lr"], seed=self.seed,
                                       weight_decay=o["weight_decay"])
        with torch.no_grad():
            self.threshold = best_threshold(torch.sigmoid(self.model(x[hold])), targets[hold])
        # The blind guess: each word's auxiliary frequency as its score for every sequence, with
        # its threshold chosen the same way; it claims the same words whatever the release.
        self.prior = targets[train].mean(0)
        self.blind_threshold = best_threshold(self.prior.expand(len(hold), -1), targets[hold])
        self.fitted = True
        return self

    @torch.no_grad()
    def predict(self, victim: Released) -> torch.Tensor:
        self._require_fitted()
        return torch.sigmoid(self.model(_pooled(self.split, victim)))

    def score(self, victim: Released) -> dict:
        prob = self.predict(victim)
        truth = self._keyword_targets(victim)
        recall, precision = recall_precision_at(prob, truth, self.threshold)
        blind, blind_precision = recall_precision_at(self.prior.expand(len(truth), -1), truth, self.blind_threshold)
        return {"asr": recall, "metric": "set recall (micro) at the aux-chosen threshold", "precision": precision,
                "blind_recall": blind, "blind_precision": blind_precision,
                "threshold": self.threshold, "keywords_used": len(self.words),
                "victim_positives": int(truth.sum()), "keywords_dropped_multitoken": self.dropped}

    def parameters(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
