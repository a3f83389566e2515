"""The privacy statement checked against the mechanism's exact density, not against its own formula.

For a token released as ``y = mu + s z`` with ``z`` d_chi noise of parameter eps, the density is

    p(y | mu, s) = (eps/s)^d * Gamma(d/2) / (2 pi^(d/2) Gamma(d)) * exp(-(eps/s) ||y - mu||)

(the radial part of ``exp(-a ||z||)`` on R^d is Gamma(d, rate a)). These tests compute that density
themselves, sample real releases from the defences, and compare with what the statement claims.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy import stats

from privtune_flwr.accounting import PrivacyStatement, run_summary
from privtune_flwr.config import RunConfig
from privtune_flwr.defenses import build_defense
from privtune_flwr.models import load_split
from tests.conftest import tiny_hf_model


def log_density(y: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """log p(y | mu, s) per token, for [..., d] tensors and [...] scales (float64)."""
    d = y.shape[-1]
    a = eps / scale.double()
    log_c = math.lgamma(d / 2) - math.log(2.0) - (d / 2) * math.log(math.pi) - math.lgamma(d)
    return d * torch.log(a) + log_c - a * (y.double() - mu.double()).norm(dim=-1)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from privtune_flwr.models import resolve_model

    split = load_split("tiny-bert", 1, hf_model=tiny_hf_model("encoder", layers=2),
                       tokenizer=AutoTokenizer.from_pretrained(resolve_model("minilm")), lora_rank=0)
    return split


def _pair(split, words=("film", "movie")):
    """Two one-word sequences of the same length: h, h' [1, T, d] and ids, mask."""
    enc_a, enc_b = split.tokenize([words[0]], 8), split.tokenize([words[1]], 8)
    assert enc_a["input_ids"].shape == enc_b["input_ids"].shape
    return (enc_a["input_ids"], enc_a["attention_mask"], split.bottom(**enc_a)), \
        (enc_b["input_ids"], enc_b["attention_mask"], split.bottom(**enc_b))


def _importance(split, ids_a, ids_b, imp_a: float, imp_b: float) -> torch.Tensor:
    imp = torch.full((split.vocab_size,), 0.0)
    imp[ids_a[0, 1]] = imp_a
    imp[ids_b[0, 1]] = imp_b
    return imp


def test_bound_holds_within_a_level_against_the_exact_density(tiny, seeded_entropy):
    split = tiny
    (ids_a, mask_a, h_a), (ids_b, mask_b, h_b) = _pair(split)
    eps = 4.0
    for level_imp in (0.0, 0.5, 1.0):  # the three public levels: s = 1, 0.75, 0.5
        imp = _importance(split, ids_a, ids_b, level_imp, level_imp)
        defense = build_defense("privtune", epsilon=eps, split=split, importance=imp, importance_levels=3,
                                release="fresh")
        statement = defense.statement()
        mu_a = h_a + defense.mean_shift(h_a, ids_a, mask_a)
        mu_b = h_b + defense.mean_shift(h_b, ids_b, mask_b)
        s_a, s_b = defense.noise_scale(ids_a), defense.noise_scale(ids_b)
        assert torch.equal(s_a, s_b)
        worst = -math.inf
        for _ in range(400):  # fresh noise each release: 400 samples of y ~ M(h_a)
            y = defense(h_a, ids_a, mask_a)
            ratio = (log_density(y, mu_a, s_a, eps) - log_density(y, mu_b, s_b, eps))[0]
            # per token, each against the bound the statement claims for that pair of tokens
            for t in range(ratio.shape[0]):
                bound = statement.pair_bound(float((h_a[0, t] - h_b[0, t]).norm()), float(s_a[0, t]), float(s_b[0, t]))
                assert bound is not None
                assert ratio[t] <= bound + 1e-6
                worst = max(worst, float(ratio[t] - bound))
        assert worst < 0  # strictly inside


def test_the_old_statement_failed_across_importance_scales(tiny, seeded_entropy):
    """Two tokens with the same representation but different importance: the old statement claimed
    a bound of exp((eps/s_i)(||h - h'|| + 2r)) = exp(0) here (no shift); the exact density ratio is
    far above it, and the norm of the release tells the scales apart."""
    split = tiny
    (ids_a, mask_a, h_a), (ids_b, _, _) = _pair(split)
    eps = 4.0
    imp = _importance(split, ids_a, ids_b, 0.0, 1.0)
    continuous = build_defense("privtune-nomean", epsilon=eps, split=split, importance=imp, importance_levels=0,
                               release="fresh")
    s_a = continuous.noise_scale(ids_a)  # word a: importance 0, s = 1
    swapped = ids_a.clone()
    swapped[0, 1] = ids_b[0, 1]
    s_b = continuous.noise_scale(swapped)
    assert float(s_a[0, 1]) == 1.0 and float(s_b[0, 1]) == 0.5
    old_claim = (eps / float(s_a[0, 1])) * (0.0 + 2 * 0.0)  # what the old statement claimed for this pair
    ratios = []
    for _ in range(200):
        y = continuous(h_a, ids_a, mask_a)  # released for word a; the same h would be word b's
        ratios.append(float(log_density(y[0, 1], h_a[0, 1], s_a[0, 1], eps) - log_density(y[0, 1], h_a[0, 1], s_b[0, 1], eps)))
    # log ratio = -d log 2 + eps ||z|| ~ d (1 - log 2) = 9.8 on average here (d = 32): above the old
    # claim on nearly every sample, and unbounded as ||z|| grows
    ratios = torch.tensor(ratios)
    assert (ratios > old_claim).float().mean() > 0.8 and ratios.max() > old_claim + 10
    # the accounting no longer claims anything for such a pair
    assert continuous.statement().pair_bound(0.0, 1.0, 0.5) is None
    levels = build_defense("privtune-nomean", epsilon=eps, split=split, importance=imp, importance_levels=3)
    assert levels.statement().pair_bound(0.0, 1.0, 0.5) is None
    assert levels.statement().pair_bound(0.0, 0.5, 0.5) == 0.0


def test_released_noise_is_scaled_by_the_token_level(tiny, seeded_entropy):
    """||y - h|| / s follows Gamma(d, rate eps) at every level (no shift: y - h = s z); without the
    scaling the levels would be indistinguishable, with it their mean norms are in ratio s."""
    split = tiny
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (60, 12), generator=gen)  # 720 distinct-ish tokens, no padding
    mask = torch.ones_like(ids)
    h = split.bottom(ids, mask)
    imp = torch.rand(split.vocab_size, generator=torch.Generator().manual_seed(1))
    eps, d = 2.0, split.hidden_size
    defense = build_defense("privtune-nomean", epsilon=eps, split=split, importance=imp, importance_levels=3, s_min=0.4)
    norms = (defense(h, ids, mask) - h).norm(dim=-1)
    scale = defense.noise_scale(ids)
    real = mask.bool()
    means = {}
    for s in (1.0, 0.7, 0.4):
        pick = real & torch.isclose(scale, torch.tensor(s))
        assert int(pick.sum()) >= 40, s
        sample = (norms[pick] / s).double().numpy()
        assert stats.kstest(sample, stats.gamma(a=d, scale=1 / eps).cdf).pvalue > 1e-3, s
        means[s] = float(norms[pick].mean())
    assert means[0.4] / means[1.0] == pytest.approx(0.4, rel=0.05)
    assert means[0.7] / means[1.0] == pytest.approx(0.7, rel=0.05)


def test_the_run_configs_statement_matches_the_defences(tiny):
    """The cloud states a run's guarantee from its config; the device's defence object states its
    own. Both go through the registry: the whole statements must be equal, for every defence that
    needs no fitted input (the label defences: tests/test_defenses.py)."""
    split = tiny
    names = ("none", "dchi", "gaussian", "privtune", "privtune-noimp", "privtune-nomean", "privtune-random-target",
             "privtune-sampled-target")
    for name in names:
        cfg = RunConfig(defense=name, epsilon=8.0, importance_levels=4, s_min=0.25, clip=3.0, release="fresh")
        defense = build_defense(name, epsilon=8.0, split=split, importance_levels=4, s_min=0.25, clip=3.0,
                                release="fresh")
        mine = defense.statement()
        theirs = cfg.statement(radius=getattr(defense, "radius", 0.0))
        assert (mine.epsilon, mine.scales, mine.continuous, mine.radius) == \
            (theirs.epsilon, theirs.scales, theirs.continuous, theirs.radius), name
        assert mine == theirs, name
    assert RunConfig(defense="privtune-nomean").statement(radius=5.0).radius == 0.0  # no shift, no slack
    assert RunConfig(defense="privtune").statement(radius=5.0).radius == 5.0


def test_run_summary_composes_and_states_reproducible_noise():
    st = PrivacyStatement(defense="privtune", epsilon=10.0, scales=(1.0, 0.5), radius=2.0)
    summary = run_summary(st, max_tokens=20, train_releases=1, test_releases=3)
    assert summary["epsilon-per-token-max"] == 20.0 and summary["slack-per-token-max"] == 80.0
    assert summary["epsilon-per-sequence-max"] == 400.0
    assert summary["per-test-sequence-composed"]["epsilon"] == 1200.0
    assert "OS entropy" in summary["guarantee"] and not summary["reproducible-noise"]
    seeded = PrivacyStatement(defense="dchi", epsilon=10.0, reproducible=True, key_source="seed 0")
    text = run_summary(seeded, max_tokens=5, train_releases=1, test_releases=1)["guarantee"]
    assert "REPRODUCIBLE NOISE" in text and "NOT private against the operator" in text
    assert "ε-DP" not in text and "epsilon-DP" not in text
    with pytest.raises(ValueError, match="release='sometimes'"):
        PrivacyStatement(defense="dchi", epsilon=1.0, release="sometimes")


def test_the_statement_says_who_fitted_the_label_subspace():
    """With the federation's map the run's guarantee may not say the device fitted it alone: it
    names the fit phase, whose own statement covers the map; a device's own fit keeps its words."""
    own = RunConfig(defense="label-subspace").statement().guarantee()
    federation = RunConfig(defense="label-subspace", subspace_fit_scope="federation").statement()
    assert "fitted once on the device's own labelled data" in own and "fit phase" not in own
    assert federation.map_scope == "federation"
    text = federation.guarantee()
    assert "federation's fit phase" in text and "fit-epsilon" in text
    assert "fitted once on the device's own" not in text
    # everything else is the same statement
    assert text.split("The protection")[1] == own.split("The protection")[1]
    assert federation.levels() == RunConfig(defense="label-subspace").statement().levels()
    with pytest.raises(ValueError, match="map_scope='cloud' is not accepted"):
        replace(federation, map_scope="cloud")
