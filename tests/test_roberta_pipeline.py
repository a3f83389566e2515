"""The attacks and the privacy-utility sweep on a non-BERT encoder given as a folder (issue 25).

The model is a tiny random RoBERTa (hidden 32, 2 blocks, split after block 1) saved with
``save_pretrained`` beside a word-level tokenizer of the same vocabulary (tests/conftest.py).
Its special tokens are RoBERTa's own: ``<s>``=0 first, ``</s>``=2 last, ``<pad>``=1 on the right,
``<unk>``=3; none of them is ever scored as a recovered token. The app's main job on the same
model is tests/test_roberta_app.py (e2e).
"""

from __future__ import annotations

import math

import pytest
import torch

from privtune_flwr.attacks import ATTACKS, make_attack, release, run_attacks
from privtune_flwr.defenses import build_defense
from privtune_flwr.device import device_defense
from privtune_flwr.models import load_split

LENGTH = 16
SMALL_ATTACKS = {"eia-mlp": {"hidden": 64, "epochs": 30, "batch_size": 32}, "eia-context": {"width": 32, "epochs": 6},
                 "aia-attribute": {"epochs": 30}, "aia-keyword": {"epochs": 20}, "aia-bow": {"epochs": 20}}
KEYWORDS = ["w0", "w1", "w2", "w50", "w60", "w70"]  # single tokens of the word-level vocabulary


def sentences(n: int, seed: int):
    """``n`` texts of 3 to 8 words, the label telling which half of the vocabulary (w0..w45 or
    w46..w91) its words come from."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = torch.randint(46 * label, 46 + 46 * label, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        texts.append(" ".join(f"w{int(w)}" for w in words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def split(roberta_folder):
    return load_split(roberta_folder, 1, "classification", 2, lora_rank=2)


@pytest.fixture(scope="module")
def attacked(split):
    """Every attack under both protocols against ``none``, ``dchi`` at epsilon 1 and
    ``label-subspace`` (fitted on 48 labelled sentences of the device's own)."""
    aux, aux_labels = sentences(48, seed=1)
    victim, victim_labels = sentences(32, seed=2)
    device_texts, device_labels = sentences(48, seed=3)
    defenses = {
        "none": device_defense("none", split, epsilon=None, texts=device_texts, labels=device_labels),
        "dchi": build_defense("dchi", epsilon=1.0, split=split, seed=1),
        "label-subspace": device_defense("label-subspace", split, epsilon=64.0, texts=device_texts,
                                         labels=device_labels, subspace_rank=1, seed=0),
    }
    out = {}
    for name, defense in defenses.items():
        rows = run_attacks(split, defense, aux, victim, aux_attributes={"label": aux_labels},
                           victim_attributes={"label": victim_labels}, attribute="label", keywords=KEYWORDS,
                           max_length=LENGTH, options=SMALL_ATTACKS, protocols=("adaptive", "static"), seed=0)
        out[name] = {(r["attack"], r["protocol"]): r for r in rows}
    return out, (aux, victim, victim_labels), defenses


def test_every_attack_scores_every_release_of_the_roberta_folder(attacked):
    scores, _, _ = attacked
    for defense, rows in scores.items():
        assert set(rows) == {(a, p) for a in ATTACKS for p in ("adaptive", "static")}, defense
        for (attack, protocol), r in rows.items():
            assert 0.0 <= r["asr"] <= 1.0 and math.isfinite(r["asr"]), (defense, attack, protocol, r["asr"])
            assert r["defense"] == defense and r["metric"]
            # the clean attacker on the clean release is the same whatever defence is tested
            assert r["asr_clean"] == scores["none"][attack, "adaptive"]["asr"]


def test_knn_inversion_is_near_perfect_on_clean_releases_and_fails_under_noise_and_the_label_map(attacked):
    scores, _, _ = attacked
    clean = scores["none"]["eia-knn", "adaptive"]["asr"]
    # Measured: 0.922 clean (a token in context still sits nearest its own anchor after one
    # block; its position in the sentence accounts for the misses); 0.013 under dchi at eps = 1
    # (E||z|| = d/eps = 32 against LayerNorm'd token norms of ~sqrt(32) = 5.7); 0.006 through the
    # rank-1 label map.
    assert clean >= 0.85
    for defense in ("dchi", "label-subspace"):
        for protocol in ("adaptive", "static"):
            assert scores[defense]["eia-knn", protocol]["asr"] <= 0.15, (defense, protocol)
    # the learned inverter too: 0.68 clean (95% of victim tokens in its vocabulary), <= 0.04 defended
    assert scores["none"]["eia-mlp", "adaptive"]["asr"] >= 0.4
    for defense in ("dchi", "label-subspace"):
        assert scores[defense]["eia-mlp", "adaptive"]["asr"] <= 0.15, defense


def test_label_is_inferred_from_clean_roberta_releases(attacked):
    scores, _, _ = attacked
    clean = scores["none"]["aia-attribute", "adaptive"]
    # the label is which half of the vocabulary a sentence uses: <s>'s pooled row tells it (0.84)
    assert clean["asr"] >= clean["majority_rate"] + 0.2
    assert scores["none"]["aia-keyword", "adaptive"]["keywords_used"] >= 4


def test_roberta_special_tokens_are_left_out_of_token_recovery(attacked, split):
    """<s> (0) opens and </s> (2) closes every row, <pad> (1) fills the right: all are released,
    none is counted. The counts equal the victim's words, exactly."""
    _, (aux, victim, _), defenses = attacked
    assert sorted(split.special_ids.tolist()) == [0, 1, 2, 3]
    rel = release(split, defenses["none"], victim, LENGTH)
    words = sum(len(t.split()) for t in victim)
    real = rel.attention_mask.bool()
    assert rel.input_ids[:, 0].eq(0).all()
    assert int(rel.input_ids[real].eq(2).sum()) == len(victim)  # one </s> per row
    assert int(rel.input_ids[~real].ne(1).sum()) == 0 and int((~real).sum()) > 0  # right padding with 1
    assert int(real.sum()) == words + 2 * len(victim)
    knn = make_attack("eia-knn", split).fit(release(split, defenses["none"], aux, LENGTH)).score(rel)
    assert knn["tokens"] == words
    # the score is the nearest-anchor recovery of the words alone, computed here by hand
    from privtune_flwr.attacks import context_free_anchors, nearest_anchor

    anchors = context_free_anchors(split)
    hit = nearest_anchor(rel.hidden[real], anchors, knn["best_metric"]) == rel.input_ids[real]
    words_only = ~torch.isin(rel.input_ids[real], torch.tensor([0, 1, 2, 3]))
    assert knn["asr"] == pytest.approx(float(hit[words_only].float().mean()))
    mlp = make_attack("eia-mlp", split, epochs=2, hidden=32).fit(release(split, defenses["none"], aux, LENGTH))
    assert mlp.score(rel)["tokens"] == words
    assert not torch.isin(mlp.vocab.ids, split.special_ids).any()  # no special token is a class of the inverter
    context = make_attack("eia-context", split, epochs=1, width=32).fit(release(split, defenses["none"], aux, LENGTH))
    assert not torch.isin(context.vocab.ids, split.special_ids).any()
    assert not set(context.blind) & {0, 1, 2, 3}


# --- the privacy-utility sweep on a RoBERTa folder -------------------------------------------------

def test_privacy_utility_sweep_runs_on_a_roberta_folder(roberta_words_folder, tmp_path, monkeypatch):
    """``SweepSettings(model=<folder>)`` (CLI ``--model <folder>``) splits the folder's RoBERTa:
    fine-tuning, the label-subspace fit and the attacks run on its releases of Rotten Tomatoes
    (its vocabulary: the corpora's 600 most frequent words), and the rows name the model."""
    from simulations import privacy_utility as pu

    monkeypatch.setenv("PRIVTUNE_CACHE", str(tmp_path / "cache"))
    asked = []
    real = pu.load_split
    monkeypatch.setattr(pu, "load_split", lambda *a, **k: asked.append(a[:2]) or real(*a, **k))
    settings = pu.SweepSettings(model=roberta_words_folder, datasets=("rotten_tomatoes",),
                                defenses=("none", "dchi", "label-subspace"), epsilons=(1.0,),
                                attacks=("eia-knn", "aia-attribute"), attack_options={"aia-attribute": {"epochs": 5}},
                                protocols=("adaptive",), max_steps=4, eval_every=2, patience=1, batch_size=8,
                                max_examples=120, max_victim=24, max_aux=48, max_length=32)
    rows = pu.sweep(settings, tmp_path / "out", plots=False, progress=False)["rows"]
    assert asked == [(roberta_words_folder, 1)]
    assert len(rows) == 3 * 2  # 3 points x 2 attacks x 1 protocol
    for r in rows:
        assert r["model"] == roberta_words_folder and r["split_layer"] == 1
        assert 0.0 <= r["utility"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 and 1 <= r["steps"] <= 4
    knn = {r["defense"]: r for r in rows if r["attack"] == "eia-knn"}
    assert knn["none"]["asr"] >= 0.7 and knn["none"]["attack_tokens"] > 100
    assert knn["dchi"]["asr"] <= 0.15 and knn["label-subspace"]["asr"] <= 0.15
    # the model is part of a point's fingerprint; at its default (minilm) stored points stay valid
    minilm = pu.SweepSettings(**{**settings.__dict__, "model": "minilm"})
    assert settings.fingerprint("rotten_tomatoes", 0) != minilm.fingerprint("rotten_tomatoes", 0)
    assert pu.SweepSettings().fingerprint("rotten_tomatoes", 0) == pu.SweepSettings(model="minilm").fingerprint("rotten_tomatoes", 0)
    with pytest.raises(ValueError, match="model='' is invalid"):
        pu.SweepSettings(model="").validate()
