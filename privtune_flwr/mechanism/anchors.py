"""Vocabulary anchors, the k-NN graph and the n-hop indirect neighbour rings (spec §2.2).

Everything here is provider-side and computed once per (model weights, split layer, k, n, M):

* ``anchors``  A [V, d]: the bottom applied to each token alone, wrapped in the model's special
  tokens, read at the token's position (for ``split_layer = 0`` the embedding output);
* ``knn``      [V, k]: each token's k most cosine-similar anchors (itself excluded);
* ``rings``    [V, M]: N_n(w), tokens at shortest-path distance exactly n in the undirected k-NN
  graph, most similar first, ``-1``-padded;
* ``targets``  [V, d]: the ring centroids t(w);
* ``median_distance``: median ||A[w] - t(w)|| over non-special tokens (the unit of the PGD radius).

Tables live in a module-level dict (Ray actors serve many simulated devices per process) and on
disk under ``cache_dir()/"anchors"``, keyed by a fingerprint of the bottom's weights as well as the
names, because tiny random test models share names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..models import SplitModel, cache_dir
from ..resources import RESOURCES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


@dataclass
class AnchorTables:
    """The provider-side tables of §2.2 (see the module docstring for shapes)."""

    anchors: torch.Tensor
    knn: torch.Tensor
    rings: torch.Tensor
    ring_sizes: torch.Tensor
    ring_hops: torch.Tensor
    targets: torch.Tensor
    median_distance: float
    key: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Memory held by the tables, in bytes."""
        tensors = (self.anchors, self.knn, self.rings, self.ring_sizes, self.ring_hops, self.targets)
        return int(sum(t.numel() * t.element_size() for t in tensors))


def check_graph_options(k: int, n_hops: int, max_neighbours: int) -> None:
    for name, value, low in (("k", k, 1), ("n_hops", n_hops, 2), ("max_neighbours", max_neighbours, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} is outside the accepted range: an integer >= {low}")


# --------------------------------------------------------------------------------------------
# anchors


def special_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a one-token text: (prefix, suffix)."""
    for probe in ("x", "a", "the", "1"):
        plain = tokenizer.encode(probe, add_special_tokens=False)
        full = tokenizer.encode(probe, add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if plain and full[start : start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain) :])
    return [], []


@torch.no_grad()
def build_anchors(split: SplitModel, *, chunk_size: int = 4096, progress=None) -> torch.Tensor:
    """Anchor table A [V, d] (float32, CPU): each vocabulary id alone between the special tokens.

    ``progress``, if given, is called with the number of rows finished after each chunk."""
    prefix, suffix = special_template(split.tokenizer)
    vocab, pos = split.vocab_size, len(prefix)
    template = torch.tensor(prefix + [0] + suffix, dtype=torch.long)
    out = torch.empty(vocab, split.hidden_size, dtype=torch.float32)
    for start in range(0, vocab, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, vocab))
        batch = template.repeat(len(ids), 1)
        batch[:, pos] = ids
        out[start : start + len(ids)] = split.bottom(batch, torch.ones_like(batch))[:, pos].float().cpu()
        if progress is not None:
            progress(len(ids))
    return out


# --------------------------------------------------------------------------------------------
# graph and rings


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def knn_graph(anchors: torch.Tensor, k: int = 8, *, chunk_size: int = 1024, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most cosine-similar other rows: (ids [V, k] long, similarities [V, k]).

    The V x V similarity matrix is never held whole (30k^2 float32 is 3.7 GB): rows go in chunks.
    """
    vocab = anchors.shape[0]
    if not 1 <= k < vocab:
        raise ValueError(f"k={k!r} is outside the accepted range 1..{vocab - 1} for {vocab} anchors")
    unit = _unit(anchors.float())
    ids = torch.empty(vocab, k, dtype=torch.long)
    sims = torch.empty(vocab, k, dtype=torch.float32)
    for start in range(0, vocab, chunk_size):
        stop = min(start + chunk_size, vocab)
        block = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start)
        block[rows, rows + start] = -float("inf")
        sims[start:stop], ids[start:stop] = block.topk(k, dim=1)
        if progress is not None:
            progress(stop - start)
    return ids, sims


def _rowwise_dot(unit: torch.Tensor, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float32)
    r, c = torch.from_numpy(rows), torch.from_numpy(cols)
    for start in range(0, len(rows), chunk):
        sl = slice(start, start + chunk)
        out[sl] = (unit[r[sl]] * unit[c[sl]]).sum(-1).numpy()
    return out


def _minus(frontier: sp.csr_matrix, reached: sp.csr_matrix) -> sp.csr_matrix:
    """Set difference of two 0/1 sparse matrices."""
    out = frontier - frontier.multiply(reached)
    out.eliminate_zeros()
    return out.tocsr()


def _ones(m: sp.csr_matrix) -> sp.csr_matrix:
    m = m.tocsr()
    m.data = np.ones_like(m.data)
    return m


def indirect_rings(
    knn: torch.Tensor,
    anchors: torch.Tensor,
    n_hops: int,
    max_neighbours: int,
    *,
    block_rows: int = 2048,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly-n-hop rings of the undirected k-NN graph: (rings [V, M] -1-padded, sizes [V], hops [V]).

    Breadth-first search runs for a block of source rows at once by sparse frontier propagation
    (frontier <- frontier @ adjacency, minus everything reached). Members are ordered by cosine
    similarity to the source and capped at ``max_neighbours``. A source whose n-hop ring is empty
    (its connected component ends sooner) takes the nearest non-empty ring at distance >= 2, i.e.
    the farthest one it has; if its component ends within one hop it takes its 1-hop neighbours.
    ``hops`` records the distance each ring was actually drawn from.
    """
    check_graph_options(int(knn.shape[1]), n_hops, max_neighbours)
    vocab = knn.shape[0]
    unit = _unit(anchors.float())
    src = np.repeat(np.arange(vocab), knn.shape[1])
    adj = sp.csr_matrix((np.ones(len(src), np.float32), (src, knn.reshape(-1).numpy())), shape=(vocab, vocab))
    adj = _ones(adj + adj.T)

    rings = torch.full((vocab, max_neighbours), -1, dtype=torch.long)
    sizes = torch.zeros(vocab, dtype=torch.long)
    hops = torch.zeros(vocab, dtype=torch.long)
    for start in range(0, vocab, block_rows):
        stop = min(start + block_rows, vocab)
        count = stop - start
        frontier = adj[start:stop]
        reached = _ones(frontier + sp.csr_matrix((np.ones(count, np.float32), (np.arange(count), np.arange(start, stop))), shape=(count, vocab)))
        frontiers = {1: frontier}
        for hop in range(2, n_hops + 1):
            frontier = _minus(_ones(frontier @ adj), reached)
            reached = _ones(reached + frontier)
            frontiers[hop] = frontier

        # BFS layers cannot skip: an empty n-hop ring means every farther ring is empty too, so
        # the nearest non-empty ring beyond one hop is the largest non-empty one below n.
        chosen = np.full(count, -1)
        for hop in range(n_hops, 0, -1):
            todo = (chosen < 0) & (np.diff(frontiers[hop].indptr) > 0)
            chosen[todo] = hop
        # Gather the chosen ring of every row as (row, col) pairs.
        rows_all, cols_all = [], []
        for hop in np.unique(chosen):
            if hop < 1:  # an isolated token (impossible for k >= 1) keeps an empty ring
                continue
            pick = np.flatnonzero(chosen == hop)
            mat = frontiers[int(hop)][pick].tocoo()
            rows_all.append(pick[mat.row])
            cols_all.append(mat.col)
        rows = np.concatenate(rows_all).astype(np.int64)
        cols = np.concatenate(cols_all).astype(np.int64)
        sim = _rowwise_dot(unit, rows + start, cols)
        order_idx = np.lexsort((-sim, rows))
        rows, cols = rows[order_idx], cols[order_idx]
        first = np.searchsorted(rows, rows, side="left")
        rank = np.arange(len(rows)) - first
        keep = rank < max_neighbours
        rings[torch.from_numpy(rows[keep] + start), torch.from_numpy(rank[keep])] = torch.from_numpy(cols[keep])
        sizes[start:stop] = torch.from_numpy(np.bincount(rows[keep], minlength=count))
        hops[start:stop] = torch.from_numpy(chosen)
        if progress is not None:
            progress(count)
    return rings, sizes, hops


def ring_centroids(anchors: torch.Tensor, rings: torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
    """Targets t(w) = mean of A over the ring of w: [V, d]."""
    out = torch.empty_like(anchors, dtype=torch.float32)
    for start in range(0, rings.shape[0], chunk_size):
        ring = rings[start : start + chunk_size]
        valid = (ring >= 0).unsqueeze(-1).float()
        summed = (anchors[ring.clamp_min(0)].float() * valid).sum(1)
        out[start : start + chunk_size] = summed / valid.sum(1).clamp_min(1.0)
    return out


# --------------------------------------------------------------------------------------------
# the cached bundle


def bottom_fingerprint(split: SplitModel) -> str:
    """sha1 of the bottom's weights, vocabulary size and special-token template (hex)."""
    cached = _FINGERPRINTS.get(split.bottom)
    if cached is not None:
        return cached
    digest = hashlib.sha1()
    digest.update(repr((split.vocab_size, split.hidden_size, split.split_layer, special_template(split.tokenizer))).encode())
    for name, tensor in sorted(split.bottom.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    _FINGERPRINTS[split.bottom] = digest.hexdigest()
    return _FINGERPRINTS[split.bottom]


def _key(split: SplitModel, k: int, n_hops: int, max_neighbours: int) -> dict:
    return {
        "version": FORMAT_VERSION,
        "model": str(split.name),
        "split_layer": int(split.split_layer),
        "k": int(k),
        "n_hops": int(n_hops),
        "max_neighbours": int(max_neighbours),
        "fingerprint": bottom_fingerprint(split),
    }


def _key_name(key: dict) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["model"])[-60:]
    return (
        f"{safe}-L{key['split_layer']}-k{key['k']}-n{key['n_hops']}-M{key['max_neighbours']}"
        f"-{key['fingerprint'][:16]}-v{key['version']}"
    )


# Relative cost per vocabulary row of the three stages (MiniLM after block 1 on 2 cores: 10 s,
# 25 s and 23 s), so that the progress bar's ETA holds across stages.
_STAGE_COST = {"anchors": 1.0, "knn": 2.5, "rings": 2.3}


def build_tables(split: SplitModel, *, k: int, n_hops: int, max_neighbours: int, progress: bool = False) -> AnchorTables:
    """Compute anchors, graph, rings, targets and the median anchor-to-target distance (no cache).

    ``progress`` shows a bar with the time left (on stderr; one line every 10 s when stderr is
    not a terminal, e.g. in a Ray actor or a log)."""
    check_graph_options(k, n_hops, max_neighbours)
    bar = _progress_bar(split) if progress else None

    def step(stage: str):
        return None if bar is None else (lambda rows: bar.update(rows * _STAGE_COST[stage]))

    try:
        anchors = build_anchors(split, progress=step("anchors"))
        knn, _ = knn_graph(anchors, k, progress=step("knn"))
        rings, sizes, hops = indirect_rings(knn, anchors, n_hops, max_neighbours, progress=step("rings"))
        if bar is not None:
            bar.update(bar.total - bar.n)  # the stage weights are floats: end on exactly 100%
    finally:
        if bar is not None:
            bar.close()
    targets = ring_centroids(anchors, rings)
    regular = torch.ones(split.vocab_size, dtype=torch.bool)
    specials = split.special_ids
    regular[specials[specials < split.vocab_size]] = False
    median = float((anchors - targets)[regular].norm(dim=-1).median())
    return AnchorTables(anchors, knn, rings, sizes, hops, targets, median, _key(split, k, n_hops, max_neighbours))


def get_tables(
    split: SplitModel, *, k: int, n_hops: int, max_neighbours: int, use_disk: bool = True
) -> AnchorTables:
    """The tables for ``split``, from memory, else from disk, else built and stored in both. The
    graph options have no defaults here: theirs are ``privtune_flwr.registry.GraphOptions``."""
    check_graph_options(k, n_hops, max_neighbours)
    key = _key(split, k, n_hops, max_neighbours)
    name = _key_name(key)
    kept = RESOURCES.get("anchors", name)
    if kept is not None:
        return kept
    if not use_disk:
        tables = build_tables(split, k=k, n_hops=n_hops, max_neighbours=max_neighbours)
    else:
        path = cache_dir() / "anchors" / f"{name}.pt"
        tables = _load(path, key)
        if tables is None:
            # One process builds, the others (Ray actors, SuperNodes on one host) wait for its file.
            with _build_lock(path):
                tables = _load(path, key)
                if tables is None:
                    tables = build_tables(split, k=k, n_hops=n_hops, max_neighbours=max_neighbours, progress=True)
                    _save(tables, path)
    RESOURCES.put("anchors", name, tables)
    return tables


def _load(path: Path, key: dict) -> AnchorTables | None:
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return AnchorTables(**stored)
    except Exception as exc:  # a corrupt or foreign file is rebuilt, not trusted
        log.warning("ignoring unreadable anchor cache %s (%s)", path, exc)
    return None


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock on ``<path>.lock``, held while one process builds the tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[device] waiting for another process to build the anchor tables {path.name}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Lines(io.TextIOBase):
    """A stream for tqdm when stderr is not a terminal: every refresh becomes one whole line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _progress_bar(split: SplitModel):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=split.vocab_size * sum(_STAGE_COST.values()),
        desc=f"[device] anchor tables for {split.name} (split {split.split_layer}), built once per cache",
        bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {elapsed} elapsed, {remaining} left",
        file=sys.stderr if tty else _Lines(sys.stderr),
        mininterval=0.5 if tty else 10.0,
    )


def _save(tables: AnchorTables, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like the model files
    torch.save({f: getattr(tables, f) for f in tables.__dataclass_fields__}, tmp)
    os.replace(tmp, path)  # atomic: concurrent processes never read a half-written table


def clear_memory_cache() -> None:
    RESOURCES.clear("anchors")


# --------------------------------------------------------------------------------------------
# nearest-anchor decoding and the device's self-audit


@torch.no_grad()
def nearest_anchor(released: torch.Tensor, anchors: torch.Tensor, metric: str = "cosine", *, chunk_size: int = 1024) -> torch.Tensor:
    """Id of the nearest anchor of each row: released [N, d], anchors [V, d] -> ids [N] (long).

    ``metric`` is ``"cosine"`` (largest cosine similarity) or ``"l2"`` (smallest Euclidean
    distance). Rows go in chunks so the N x V score matrix is never materialised.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric={metric!r} is unknown; accepted: 'cosine', 'l2'")
    if released.dim() != 2 or anchors.dim() != 2 or released.shape[1] != anchors.shape[1]:
        raise ValueError(f"released {tuple(released.shape)} and anchors {tuple(anchors.shape)} must be [N, d] and [V, d]")
    anchors = anchors.to(device=released.device, dtype=torch.float32)
    if metric == "cosine":
        table, bias = _unit(anchors), None
    else:  # argmin ||x - a||^2 = argmax (2 x.a - ||a||^2)
        table, bias = 2.0 * anchors, anchors.pow(2).sum(-1)
    out = torch.empty(released.shape[0], dtype=torch.long, device=released.device)
    for start in range(0, released.shape[0], chunk_size):
        rows = released[start : start + chunk_size].float()
        scores = (_unit(rows) if metric == "cosine" else rows) @ table.T
        if bias is not None:
            scores -= bias
        out[start : start + chunk_size] = scores.argmax(-1)
    return out


def real_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: attended positions that hold a non-special token."""
    special = torch.isin(input_ids, special_ids.to(input_ids.device))
    return attention_mask.bool() & ~special


@torch.no_grad()
def self_audit(
    released: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    anchors: torch.Tensor,
    special_ids: torch.Tensor,
) -> float:
    """KNN-inversion top-1 token recovery on a released batch [B, T, d], the stronger of cosine and L2.

    Counted over real, non-special tokens; a fraction in [0, 1] (0.0 when there are none).
    """
    keep = real_token_mask(input_ids, attention_mask, special_ids)
    if not keep.any():
        return 0.0
    rows, truth = released[keep], input_ids[keep]
    return max(float((nearest_anchor(rows, anchors, m) == truth).float().mean()) for m in ("cosine", "l2"))
