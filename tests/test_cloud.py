"""Fine-tuning to convergence (privtune_flwr.cloud): the stop rule, the held-out split, the released set."""

from __future__ import annotations

import datasets
import pytest
import torch

from privtune_flwr.cloud import CloudSide, NonFiniteUpdate
from simulations import training as cloud_mod
from simulations.training import ReleasedSet, StopRule, bucketed_batches, fine_tune_to_convergence
from privtune_flwr.data import holdout
from privtune_flwr.defenses import build_defense
from privtune_flwr.device import DeviceSide
from privtune_flwr.models import load_split
from tests.conftest import tiny_hf_model

torch.set_num_threads(1)

WORDS = ["good", "bad", "fine", "dull", "great", "awful", "nice", "poor"]


def _texts(n: int, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = {"text": [], "label": []}
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)]
        rows["text"].append(" ".join(words))
        rows["label"].append(int("good" in words))
    return datasets.Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def tiny(minilm_tokenizer):
    split = load_split("tiny-bert", 1, "classification", 2, hf_model=tiny_hf_model("encoder", layers=2),
                       tokenizer=minilm_tokenizer)
    device = DeviceSide(split, build_defense("none", split=split), max_length=16, audit_tokens=0)
    return split, device


@pytest.mark.parametrize("key,value", [("patience", 0), ("eval_every", -1), ("max_steps", 2.5), ("patience", True)])
def test_stop_rule_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}.*integer >= 1"):
        StopRule(**{key: value})


def test_holdout_is_stratified_disjoint_and_seeded():
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(100)], "label": [0] * 80 + [1] * 20})
    train, val = holdout(ds, 0.1, seed=3)
    assert sorted(val["label"]).count(1) == 2 and sorted(val["label"]).count(0) == 8
    assert not set(train["text"]) & set(val["text"]) and len(train) + len(val) == 100
    again = holdout(ds, 0.1, seed=3)[1]
    assert again["text"] == val["text"] and holdout(ds, 0.1, seed=4)[1]["text"] != val["text"]
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"fraction=.*\(0, 1\)"):
            holdout(ds, bad)


def test_bucketed_batches_cover_each_example_once_and_pad_little():
    lengths = torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0))
    batches = bucketed_batches(lengths, 16, torch.Generator().manual_seed(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).split(16)
    assert padded < 0.8 * sum(len(b) * int(lengths[b].max()) for b in shuffled)


def test_released_set_is_the_device_release_trimmed(tiny):
    split, device = tiny
    ds = _texts(10)
    released = ReleasedSet(device, ds["text"], ds["label"], chunk=3)
    whole = device.release(ds["text"], ds["label"])
    for i in range(10):
        assert torch.equal(released.rows[i], whole.hidden[i][whole.attention_mask[i].bool()])
    hidden, mask, labels = released.batch([4, 1])
    assert hidden.shape[:2] == mask.shape and mask.sum(1).tolist() == [int(released.lengths[4]), int(released.lengths[1])]
    assert labels.tolist() == [ds["label"][4], ds["label"][1]]


def _scripted(monkeypatch, scores):
    """evaluate_set returns ``scores`` in turn and records the top's weights at each call."""
    calls = []

    def fake(cloud, released, batch_size=64):
        calls.append(cloud.split.trainable_state())
        value = scores[len(calls) - 1]
        return {"accuracy": value, "macro-f1": value, "loss": 1.0 - value, "num-examples": float(len(released))}

    monkeypatch.setattr(cloud_mod, "evaluate_set", fake)
    return calls


def test_stops_after_patience_and_restores_the_best_weights(tiny, monkeypatch):
    split, device = tiny
    calls = _scripted(monkeypatch, [0.5, 0.7, 0.6, 0.65, 0.9, 0.9])
    start = split.trainable_state()
    cloud = CloudSide(split, learning_rate=1e-2, batch_size=4)
    train, val = holdout(_texts(40), 0.25)
    out = fine_tune_to_convergence(device, cloud, train, val, StopRule(patience=2, eval_every=3, max_steps=100))
    assert out["stopped_by"] == "patience" and out["steps"] == 12 and out["best_step"] == 6
    assert out["best_validation"] == 0.7 and [h[0] for h in out["history"]] == [3, 6, 9, 12]
    assert out["train_examples"] == 30 and out["epochs"] == pytest.approx(12 * 4 / 30)
    now = split.trainable_state()
    assert all(torch.equal(now[k], calls[1][k]) for k in now)  # the weights scored 0.7
    assert any(not torch.equal(now[k], start[k]) for k in now)  # and they did train
    split.load_trainable_state(start)


def test_stops_at_the_cap_and_reports_the_steps(tiny, monkeypatch):
    split, device = tiny
    _scripted(monkeypatch, [0.1 * i for i in range(1, 20)])
    start = split.trainable_state()
    cloud = CloudSide(split, learning_rate=1e-2, batch_size=4)
    train, val = holdout(_texts(40), 0.25)
    out = fine_tune_to_convergence(device, cloud, train, val, StopRule(patience=2, eval_every=4, max_steps=10))
    assert out["stopped_by"] == "max-steps" and out["steps"] == 10 and out["best_step"] == 10
    assert [h[0] for h in out["history"]] == [4, 8, 10]
    split.load_trainable_state(start)


def test_learns_a_separable_task(tiny):
    split, device = tiny
    start = split.trainable_state()
    cloud = CloudSide(split, learning_rate=2e-2, batch_size=8)
    train, val = holdout(_texts(400, seed=1), 0.2)
    out = fine_tune_to_convergence(device, cloud, train, val, StopRule(patience=3, eval_every=20, max_steps=400))
    majority = max(sum(val["label"]), len(val) - sum(val["label"])) / len(val)
    assert out["best_validation"] > majority + 0.1  # "does it say good": learnable even by a tiny random top
    assert cloud_mod.evaluate_set(cloud, ReleasedSet(device, val["text"], val["label"]))["accuracy"] == out["best_validation"]
    with pytest.raises(ValueError, match="metric='f1'"):
        fine_tune_to_convergence(device, cloud, train, val, metric="f1")
    split.load_trainable_state(start)


def _fresh(split, start, lr=2e-2):
    split.load_trainable_state(start)
    return CloudSide(split, learning_rate=lr, batch_size=8)


def test_a_round_interleaves_the_devices_batches_so_skewed_shares_do_not_tip_the_top(tiny):
    """Two devices, each holding one class (a Dirichlet extreme). Stepping through one release
    after the other ends the round on the second device's class, and the top then calls nearly
    everything that class; the round's batches interleaved keep both classes."""
    split, device = tiny
    start = split.trainable_state()
    data = _texts(600, seed=3)
    zeros = data.filter(lambda r: r["label"] == 0).select(range(64))
    ones = data.filter(lambda r: r["label"] == 1).select(range(64))
    val = _texts(200, seed=4)
    shares = [device.release(s["text"], s["label"]) for s in (zeros, ones)]
    released_val = ReleasedSet(device, val["text"], val["label"])

    out = {}
    ROUNDS = 6
    for how in ("in turn", "interleaved"):
        torch.manual_seed(0)  # the top's dropout
        cloud = _fresh(split, start)
        for _ in range(ROUNDS):
            if how == "in turn":
                for rel in shares:
                    cloud.train_on(rel.hidden, rel.attention_mask, rel.labels)
            else:
                losses, dropped = cloud.train_round([(r.hidden, r.attention_mask, r.labels) for r in shares])
                assert not dropped and len(losses) == 16
            out.setdefault(how, []).append(cloud_mod.evaluate_set(cloud, released_val)["macro-f1"])
    split.load_trainable_state(start)
    assert sum(f < 0.4 for f in out["in turn"]) >= ROUNDS - 1, out  # one class called for (nearly) every input
    assert out["interleaved"][-1] > 0.9 and min(out["interleaved"][1:]) > max(out["in turn"]) + 0.2, out


def test_a_release_that_breaks_a_step_is_undone_and_the_round_replayed_without_it(tiny):
    """A middle release whose second batch overflows the top: the round is rolled back and replayed
    without it, ending exactly where the round of the other two ends; the others' order is kept."""
    split, device = tiny
    start = split.trainable_state()
    data = _texts(48, seed=5)
    a, b = (device.release(data["text"][i:i + 16], data["label"][i:i + 16]) for i in (0, 16))
    c = device.release(data["text"][32:48], data["label"][32:48])
    bad_hidden = c.hidden.clone()
    bad_hidden[8:] = 3e38  # finite, under float32's max; the top's first matmul overflows
    releases = [(a.hidden, a.attention_mask, a.labels), (bad_hidden, c.attention_mask, c.labels),
                (b.hidden, b.attention_mask, b.labels)]
    torch.manual_seed(0)
    cloud = _fresh(split, start)
    losses, dropped = cloud.train_round(releases)
    assert list(dropped) == [1] and "batch 1 gave a non-finite loss" in dropped[1], dropped
    assert len(losses) == 4 and cloud.steps == 4
    poisoned = split.trainable_state()
    torch.manual_seed(0)
    clean = _fresh(split, start)
    clean_losses, none_dropped = clean.train_round([releases[0], releases[2]])
    assert not none_dropped and clean_losses == losses
    assert all(torch.equal(poisoned[k], v) for k, v in split.trainable_state().items())
    with pytest.raises(NonFiniteUpdate, match="batch 1 gave a non-finite loss"):  # one release alone: as before
        _fresh(split, start).train_on(*releases[1])
    split.load_trainable_state(start)
