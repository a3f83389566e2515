"""Token-substitution variants (simulations/substitution.py): the Bayes ceiling and the releases."""

from __future__ import annotations

import pytest
import torch

from privtune_flwr.models import load_split
from simulations import substitution as sub
from tests.conftest import tiny_hf_model

torch.set_num_threads(1)


def _none_kept(v=6):
    return torch.zeros(v, dtype=torch.bool)


def test_ceiling_of_a_fixed_code_is_total_recovery():
    # every token becomes one fixed other token: a bijection, so an attacker recovers everything
    rows = torch.tensor([[1], [0], [3], [2], [5], [4]])
    prior = torch.tensor([0.4, 0.1, 0.2, 0.2, 0.05, 0.05])
    victim = torch.tensor([0, 1, 2, 3, 4, 5, 1])
    assert sub.substitution_ceiling(rows, prior, victim, _none_kept(), torch.arange(6)) == pytest.approx(1.0)


def test_ceiling_of_shared_candidate_sets_is_the_prior_guess():
    # 0 and 1 both become a uniform member of {0, 1}: the attacker always guesses the likelier 0
    rows = torch.tensor([[0, 1], [0, 1], [2, -1], [3, -1], [4, -1], [5, -1]])
    prior = torch.tensor([0.4, 0.1, 0.2, 0.2, 0.05, 0.05])
    assert sub.substitution_ceiling(rows, prior, torch.tensor([0, 1]), _none_kept(), torch.arange(6)) == pytest.approx(0.5)
    kept = _none_kept()
    kept[1] = True  # 1 is released as itself, but 0 reaches the id 1 more often (0.4 / 2 > 0.1)
    assert sub.substitution_ceiling(rows, prior, torch.tensor([0]), kept, torch.arange(6)) == pytest.approx(1.0)
    assert sub.substitution_ceiling(rows, prior, torch.tensor([1]), kept, torch.arange(6)) == pytest.approx(0.0)


def test_ceiling_of_uniform_substitution():
    prior = torch.tensor([0.4, 0.1, 0.2, 0.2, 0.05, 0.05])
    regular = torch.arange(6)
    # every id guessed as the most likely token 0, which is hit whatever it becomes
    assert sub.substitution_ceiling(None, prior, torch.tensor([0, 1]), _none_kept(), regular) == pytest.approx(0.5)
    kept = _none_kept()
    kept[1] = True  # 1 is always released as itself; the id 1 is no longer a hit for 0
    assert sub.substitution_ceiling(None, prior, torch.tensor([0, 1]), kept, regular) == pytest.approx((5 / 6 + 1.0) / 2)


@pytest.mark.parametrize("spec,match", [("nope", "mode"), ("subst-ring:0", "hops"), ("subst-ring:2:1.5", "keep"),
                                        ("swap-ring:2:0:2", "alpha"), ("subst-ring:x", "malformed"),
                                        ("subst-ring:2:0:0.5:9", "too many")])
def test_bad_variants_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        sub.parse_variant(spec)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from privtune_flwr.models import resolve_model

    split = load_split("tiny-bert", 1, hf_model=tiny_hf_model("encoder", layers=2),
                       tokenizer=AutoTokenizer.from_pretrained(resolve_model("minilm")), lora_rank=0)
    enc = split.tokenize(["a wonderful and moving film", "dull", "the plot is thin but the actors shine"], 16)
    return split, enc["input_ids"], enc["attention_mask"], split.bottom(enc["input_ids"], enc["attention_mask"])


def test_swap_ring_moves_each_token_onto_a_ring_member(tiny):
    split, ids, mask, hidden = tiny
    d = sub.SubstitutionDefense(split, 1e9, seed=0, mode="swap-ring", hops=2, keep=0.0)  # noise ~ 0
    shift = d(hidden, ids, mask) - hidden
    regular = mask.bool() & ~torch.isin(ids, split.special_ids)
    for b, t in regular.nonzero().tolist():
        members = d.rings[ids[b, t]][d.rings[ids[b, t]] >= 0]
        moved = d.anchors[members] - d.anchors[ids[b, t]]
        assert (moved - shift[b, t]).norm(dim=-1).min() < 1e-3
    special = mask.bool() & ~regular
    assert shift[special].abs().max() < 1e-3


def test_uniform_substitution_keeps_important_tokens_and_replaces_the_rest(tiny):
    split, ids, mask, hidden = tiny
    corpus = [split.tokenizer(t)["input_ids"] for t in ["wonderful film", "dull film", "moving story", "dull plot"]]
    importance = {"sequences": corpus, "labels": [1, 0, 1, 0], "task": "classification"}
    d = sub.SubstitutionDefense(split, 1e9, seed=0, mode="subst-uniform", hops=0, keep=0.3, importance=importance)
    kept = d.kept()
    assert kept[split.special_ids].all() and 0 < int(kept.sum()) - len(split.special_ids) < split.vocab_size
    out = d(hidden, ids, mask)
    same = (out - hidden).norm(dim=-1) < 1e-3
    regular = mask.bool() & ~torch.isin(ids, split.special_ids)
    assert not same[regular].all()  # unkept tokens became other tokens (and change their context)
    assert 0 < d.substituted_share(ids, mask) <= 1 and "no formal statement" in d.statement().guarantee()
    with pytest.raises(ValueError, match="keep > 0 needs importance"):
        sub.SubstitutionDefense(split, 1.0, seed=0, mode="subst-uniform", hops=0, keep=0.3)
