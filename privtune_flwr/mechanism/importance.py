"""Token importance from the device's local corpus (spec §2.4): TF-IDF blended with entropy cues.

``imp(w) = alpha * tfidf(w) + (1 - alpha) * ent(w)`` in [0, 1], where

* ``tfidf(w)``: mean over the local documents containing ``w`` of ``(1 + log tf) * idf`` with the
  smooth ``idf = log((1 + D) / (1 + df)) + 1``, divided by its maximum;
* ``ent(w)``: for classification ``1 - H(class | w) / log C`` over the Laplace-smoothed class counts
  of the documents containing ``w``; for generation ``1 - H(doc | w) / log D`` with
  ``p(doc | w)`` proportional to the count of ``w`` in the document.

Special tokens get 0; tokens never seen locally get the median over the seen ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..vocab import TASKS


def _entropy_rows(p: sp.csr_matrix) -> np.ndarray:
    """Shannon entropy (nats) of every row of a row-stochastic sparse matrix."""
    logp = p.copy()
    logp.data = np.log(np.clip(logp.data, 1e-300, None))
    return -np.asarray(p.multiply(logp).sum(axis=1)).ravel()


class Importance:
    """Per-vocabulary-id importance ``values`` [V] (float32, in [0, 1]) built from token-id sequences.

    ``sequences`` are the device's local documents as lists of token ids (padding removed or
    listed in ``special_ids``); ``labels`` (one int per document) are needed for classification.
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        labels: Sequence[int] | None = None,
        task: str = "classification",
        *,
        vocab_size: int,
        special_ids: Sequence[int] | torch.Tensor = (),
        alpha: float = 0.5,
    ):
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported; accepted: {', '.join(TASKS)}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha!r} is outside the accepted range [0, 1]")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 1")
        docs = [np.asarray(list(s), dtype=np.int64) for s in sequences]
        if not docs:
            raise ValueError("sequences is empty; importance needs at least one local document")
        if task == "classification":
            if labels is None or len(labels) != len(docs):
                raise ValueError(
                    f"classification importance needs one label per sequence; got "
                    f"{None if labels is None else len(labels)} labels for {len(docs)} sequences"
                )
        self.task, self.alpha, self.vocab_size = task, float(alpha), vocab_size

        specials = np.asarray(torch.as_tensor(special_ids, dtype=torch.long).tolist(), dtype=np.int64)
        doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
        ids = np.concatenate(docs) if doc_of.size else np.zeros(0, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token ids span {ids.min()}..{ids.max()}; accepted: 0..{vocab_size - 1}")
        keep = ~np.isin(ids, specials)
        ids, doc_of = ids[keep], doc_of[keep]
        n_docs = len(docs)
        counts = sp.csr_matrix((np.ones(len(ids)), (ids, doc_of)), shape=(vocab_size, n_docs))  # [V, D]
        counts.sum_duplicates()
        df = np.diff(counts.indptr).astype(np.float64)
        seen = df > 0

        # TF-IDF: sub-linear tf, smooth idf, averaged over the documents that hold the token.
        idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
        tf = counts.copy()
        tf.data = 1.0 + np.log(tf.data)
        tfidf = np.zeros(vocab_size)
        tfidf[seen] = (np.asarray(tf.sum(axis=1)).ravel()[seen] / df[seen]) * idf[seen]
        tfidf /= max(tfidf.max(), 1e-12)

        ent = np.zeros(vocab_size)
        if task == "classification":
            y = np.asarray(list(labels), dtype=np.int64)
            classes, y = np.unique(y, return_inverse=True)
            n_cls = len(classes)
            if n_cls >= 2:
                present = counts.copy()
                present.data[:] = 1.0
                per_class = np.asarray((present @ sp.csr_matrix((np.ones(n_docs), (np.arange(n_docs), y)), shape=(n_docs, n_cls))).todense())
                p = (per_class + 1.0) / (per_class.sum(1, keepdims=True) + n_cls)  # Laplace smoothing
                ent = 1.0 - (-(p * np.log(p)).sum(1)) / np.log(n_cls)
        elif n_docs >= 2:
            totals = np.asarray(counts.sum(axis=1)).ravel()
            p = sp.diags(1.0 / np.maximum(totals, 1.0)) @ counts
            ent = 1.0 - _entropy_rows(p.tocsr()) / np.log(n_docs)
        ent = np.clip(ent, 0.0, 1.0)

        values = self.alpha * tfidf + (1.0 - self.alpha) * ent
        median = float(np.median(values[seen])) if seen.any() else 0.5
        values[~seen] = median
        values[specials[(specials >= 0) & (specials < vocab_size)]] = 0.0
        self.values = torch.from_numpy(np.clip(values, 0.0, 1.0)).to(torch.float32)
        self.seen = torch.from_numpy(seen)

    @classmethod
    def uniform(cls, vocab_size: int, special_ids=(), value: float = 0.5) -> "Importance":
        """No local corpus: every regular token gets ``value``, specials 0."""
        obj = cls.__new__(cls)
        obj.task, obj.alpha, obj.vocab_size = None, None, vocab_size
        values = torch.full((vocab_size,), float(value))
        specials = torch.as_tensor(special_ids, dtype=torch.long)
        values[specials[(specials >= 0) & (specials < vocab_size)]] = 0.0
        obj.values, obj.seen = values, torch.zeros(vocab_size, dtype=torch.bool)
        return obj

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Importance of each id: same shape as ``input_ids``, float32."""
        return self.values.to(input_ids.device)[input_ids]
