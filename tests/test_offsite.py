"""Offsite tuning (FedBiOT / ScaleOT style): emulators, adapters, FedAvg and a round end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from privtune_flwr import offsite
from privtune_flwr.config import OFFSITE_METHODS, RunConfig, middle_keep_count
from strategies.offsite import OffsiteCloud, OffsiteStrategy, fedavg, parse_train_reply
from tests.conftest import tiny_hf_model

AUX = ["a quiet film about grief and a family that will not talk", "the plot is thin but the actors are great fun",
       "an overlong mess with one good scene", "it is warm , funny and wise", "i wanted to leave after ten minutes",
       "a fine score and a finer cast", "dull , dull , dull", "the best thing this director has made"] * 4


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on two shared cores run these small models several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(minilm_tokenizer, method="fedbiot", *, task="classification", layers=6, drop=0.5, distill_steps=0, **kw):
    family = "decoder" if task == "generation" else "encoder"
    model = tiny_hf_model(family, task, layers=layers)
    if family == "decoder":  # loading a decoder sets its tokenizer's padding side: not the shared one's
        minilm_tokenizer = copy.deepcopy(minilm_tokenizer)
    return offsite.build_offsite("tiny", task=task, method=method, adapter_layers=kw.pop("adapter_layers", 1),
                                 emulator_drop=drop, distill_steps=distill_steps, lora_rank=4, max_length=24,
                                 aux_texts=AUX, hf_model=model, tokenizer=minilm_tokenizer, **kw)


# -- layer selection ----------------------------------------------------------------------------------


def test_stride_selection_keeps_every_kth_middle_block():
    assert offsite.stride_selection(6, 1, 0.5) == [0, 1, 3, 5]  # middle 1..4: every 2nd
    assert offsite.stride_selection(10, 1, 0.5) == [0, 1, 3, 5, 7, 9]
    assert offsite.stride_selection(12, 2, 0.75) == [0, 1, 2, 6, 10, 11]  # middle 2..9 (8): every 4th
    assert offsite.stride_selection(30, 2, 2 / 3) == [0, 1] + [2, 4, 7, 10, 13, 16, 19, 22, 25] + [28, 29]  # SmolLM2: M=26, K=9
    # a stride that is not an integer: floor(i M / K) over the middle
    assert offsite.stride_selection(9, 1, 3 / 7) == [0, 1, 2, 4, 6, 8]  # M=7, K=4: positions 0, 1, 3, 5


def test_importance_selection_keeps_the_highest_scores_in_model_order():
    scores = [9.0, 0.1, 0.5, 0.3, 0.5, 0.9, 0.2, 9.0]  # adapters (0, 7) always stay, whatever their score
    assert offsite.importance_selection(scores, 1, 0.5) == [0, 2, 4, 5, 7]  # keep 3 of 6: 0.9, 0.5, 0.5 (ties: lower index)
    assert offsite.importance_selection(scores, 1, 5 / 6) == [0, 5, 7]


@pytest.mark.parametrize("layers,adapters,drop,needle", [
    (6, 1, 0.9, "offsite.emulator-drop=0.9 is outside the accepted range: a drop that keeps a middle block: this one drops all 4 middle blocks"),
    (6, 1, 0.1, "offsite.emulator-drop=0.1 is outside the accepted range: a drop that removes a middle block: this one drops none"),
    (6, 3, 0.5, "offsite.adapter-layers=3 is outside the accepted range: 1..2 for a model of 6 blocks"),
    (6, 0, 0.5, "offsite.adapter-layers=0 is outside the accepted range: 1..2"),
])
def test_emulators_that_drop_every_block_or_none_are_refused(layers, adapters, drop, needle):
    with pytest.raises(ValueError) as err:
        middle_keep_count(layers, adapters, drop)
    assert needle in str(err.value)


@pytest.mark.parametrize("key,value,needle", [
    ("offsite.emulator-drop", 0.95, "offsite.emulator-drop=0.95 is outside the accepted range: a drop that keeps a middle block"),
    ("offsite.emulator-drop", 0.05, "offsite.emulator-drop=0.05 is outside the accepted range: a drop that removes a middle block"),
    ("offsite.emulator-drop", 1.0, "offsite.emulator-drop=1.0 is outside the accepted range: (0, 1)"),
    ("offsite.adapter-layers", 3, "offsite.adapter-layers=3 is outside the accepted range: 1..2 for a model of 6 blocks"),
    ("offsite.adapter-layers", 0, "offsite.adapter-layers=0 is outside the accepted range: an integer >= 1"),
    ("offsite.method", "fedprox", "offsite.method='fedprox' is outside the accepted range: 'fedbiot' or 'scaleot'"),
    ("offsite.svd-rank-fraction", 0.0, "offsite.svd-rank-fraction=0.0 is outside the accepted range: (0, 1]"),
    ("offsite.local-steps", 0, "offsite.local-steps=0 is outside the accepted range: 1..4096"),
    ("offsite.distill-steps", -1, "offsite.distill-steps=-1 is outside the accepted range: 0..100000"),
    ("model.lora-rank", 0, "model.lora-rank=0 is outside the accepted range: >= 1 with federation.protocol='offsite'"),
])
def test_bad_offsite_configs_name_the_value_and_range(key, value, needle):
    with pytest.raises(ValueError) as err:
        RunConfig.from_flower({"federation.protocol": "offsite", key: value})
    assert needle in str(err.value)
    assert OFFSITE_METHODS == offsite.METHODS
    RunConfig.from_flower({"federation.protocol": "offsite", "model.name": "smollm2", "offsite.emulator-drop": 0.9})  # 26 middle blocks: keeps 3


def test_a_bad_emulator_of_another_model_is_refused_when_built(minilm_tokenizer):
    with pytest.raises(ValueError, match="offsite.emulator-drop=0.9 is outside the accepted range: a drop that keeps a middle block"):
        _tiny(minilm_tokenizer, drop=0.9)


# -- emulator size, SVD, distillation ---------------------------------------------------------------


def test_fedbiot_emulator_is_smaller_by_the_dropped_blocks(minilm_tokenizer):
    off = _tiny(minilm_tokenizer)
    r = off.report
    assert off.kept == r["kept-blocks"] == [0, 1, 3, 5] and r["dropped-blocks"] == [2, 4]
    assert len(offsite.block_list(off.emulator.base_model.model, "encoder")) == 4
    block = offsite.count_parameters(offsite.block_list(off.full.base_model.model, "encoder")[0])
    assert r["block-parameter-ratio"] == pytest.approx(4 / 6)
    assert r["emulator-parameters"] == r["full-parameters"] - 2 * block
    assert r["parameter-ratio"] == pytest.approx((r["full-parameters"] - 2 * block) / r["full-parameters"])
    # adapters: LoRA on blocks 0 and 5 (query, value) and the classifier, under the full model's block indices
    keys = list(off.adapter_spec())
    assert {k.split(".")[3] for k in keys if ".layer." in k} == {"0", "5"}
    assert any(k.startswith("classifier.") for k in keys)
    assert all("lora_" in k or k.startswith("classifier.") for k in keys)


def test_svd_error_falls_as_rank_grows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32)
    errors = [offsite.compression_error(linear, r) for r in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5
    x = torch.randn(5, 48)
    assert torch.allclose(offsite.low_rank(linear, 32)(x), linear(x), atol=1e-5)


def test_scaleot_scores_blocks_keeps_the_important_ones_and_factorises_their_attention(minilm_tokenizer):
    off = _tiny(minilm_tokenizer, "scaleot", svd_rank_fraction=0.25)
    r = off.report
    scores = r["importance"]
    assert len(scores) == 6 and all(0 <= s <= 2 for s in scores)
    assert off.kept == offsite.importance_selection(scores, 1, 0.5)
    middle = [i for i in off.kept if i not in (0, 5)]
    assert sorted(middle) == sorted(sorted(range(1, 5), key=lambda i: (-scores[i], i))[:2])
    # each kept middle block: 4 projections 32x32 (+ bias) become rank 8: 8 * (32 + 32) weights instead of 32 * 32
    assert set(r["svd-ranks"].values()) == {8} and len(r["svd-ranks"]) == 4 * 2
    full_block = offsite.count_parameters(offsite.block_list(off.full.base_model.model, "encoder")[0])
    saved = 2 * 4 * (32 * 32 - 8 * 64)
    assert r["emulator-parameters"] == r["full-parameters"] - 2 * full_block - saved
    emu_blocks = offsite.block_list(off.emulator.base_model.model, "encoder")
    assert isinstance(emu_blocks[1].attention.self.query, offsite.LowRankLinear)
    assert not isinstance(emu_blocks[0].attention.self.query.base_layer, offsite.LowRankLinear)  # adapters stay whole


def test_distillation_aligns_the_emulator_at_the_adapter_boundary(minilm_tokenizer):
    off = _tiny(minilm_tokenizer, "scaleot", distill_steps=25, svd_rank_fraction=0.25)
    r = off.report
    assert r["distill-error-after"] < 0.8 * r["distill-error-before"], r


# -- adapters: plug-in, round trip, FedAvg ------------------------------------------------------------


def _batches(off, n=4, size=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        texts = AUX[i * size % len(AUX):][:size]
        enc = off.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"], torch.randint(0, 2, (len(texts),), generator=g)))
    return out


def test_trained_adapters_plug_into_the_full_model_and_round_trip_exactly(minilm_tokenizer):
    off = _tiny(minilm_tokenizer)
    ids, mask, _ = _batches(off, 1)[0]
    with torch.no_grad():
        before = off.full(input_ids=ids, attention_mask=mask).logits.clone()
    start = off.adapter_state(emulator=True)
    losses = offsite.train_emulator(off, _batches(off), learning_rate=1e-2, seed=0)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    trained = off.adapter_state(emulator=True)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    # through Flower's ArrayRecord, as the reply carries them, and into the full model's first/last blocks
    received = offsite.read_adapters(offsite.adapters_record(trained), off.adapter_spec())
    assert all(torch.equal(received[k], trained[k]) for k in trained)
    off.load_adapters(received)
    assert all(torch.equal(v, trained[k]) for k, v in off.adapter_state().items())
    with torch.no_grad():
        after = off.full(input_ids=ids, attention_mask=mask).logits
    assert (after - before).abs().max() > 1e-4


def test_decoder_generation_emulator_trains_its_lora_adapters(minilm_tokenizer):
    off = _tiny(minilm_tokenizer, task="generation", distill_steps=3)
    assert off.task == "generation" and off.kept == [0, 1, 3, 5]
    keys = list(off.adapter_spec())
    assert keys and all("lora_" in k for k in keys) and {k.split(".")[2] for k in keys} == {"0", "5"}
    texts = AUX[:8]
    before = offsite.score(off, texts, None, emulator=True, max_length=24)
    enc = off.tokenizer(texts, padding=True, return_tensors="pt")
    offsite.train_emulator(off, [(enc["input_ids"], enc["attention_mask"], None)] * 6, learning_rate=1e-2, seed=0)
    after = offsite.score(off, texts, None, emulator=True, max_length=24)
    assert after["loss"] < before["loss"] and after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    off.load_adapters(off.adapter_state(emulator=True))
    assert math.isfinite(offsite.score(off, texts, None, emulator=False, max_length=24)["perplexity"])


def _reply(state, n, *, loss=0.5, steps=2):
    return RecordDict({offsite.ADAPTERS: offsite.adapters_record(state),
                       offsite.METRICS: MetricRecord({"num-examples": float(n), "train-loss": loss, "local-steps": float(steps)})})


def test_fedavg_of_two_updates_is_the_example_weighted_mean():
    torch.manual_seed(0)
    a = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    b = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    mean = fedavg([_reply(a, 10), _reply(b, 30)])
    for k in a:
        assert torch.allclose(mean[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6)


class _ScriptedGrid:
    """Each sampled device answers with whatever ``answers`` makes of the instruction it got."""

    def __init__(self, answers):
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            sent = offsite.read_adapters(m.content.array_records[offsite.ADAPTERS],
                                         {k: tuple(v.shape) for k, v in m.content.array_records[offsite.ADAPTERS].items()})
            reply = Message(content=self.answers[m.metadata.dst_node_id](sent), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def test_bad_replies_are_rejected_and_never_reach_the_adapters(minilm_tokenizer):
    off = _tiny(minilm_tokenizer)
    cfg = RunConfig(protocol="offsite", devices_per_round=5, min_devices=5, local_steps=2)
    cloud = OffsiteCloud(cfg, off)
    strategy = OffsiteStrategy(cloud, cfg)
    start = cloud.trainable_state()
    good = {k: v + 0.5 for k, v in start.items()}
    key = next(iter(good))

    def with_nan(sent):
        bad = {k: v.clone() for k, v in good.items()}
        bad[key].view(-1)[0] = float("nan")
        return _reply(bad, 10)

    def float64(sent):
        record = offsite.adapters_record(good)
        record[key] = Array(good[key].double().numpy())
        return RecordDict({offsite.ADAPTERS: record, offsite.METRICS: MetricRecord({"num-examples": 10.0})})

    answers = {
        1: lambda sent: _reply(good, 10),
        2: lambda sent: _reply({**good, "extra.weight": torch.zeros(2)}, 10),  # a key too many
        3: lambda sent: _reply({k: (v[:1] if k == key else v) for k, v in good.items()}, 10),  # a wrong shape
        4: with_nan,
        5: float64,
    }
    assert strategy.train_round(_ScriptedGrid(answers), 1, [1, 2, 3, 4, 5])
    causes = {e["device"]: e["cause"] for e in strategy.rejected.entries}
    assert len(causes) == 4 and "node 1 (partition unknown)" not in causes
    assert "unexpected" in causes["node 2 (partition unknown)"]
    assert "shape" in causes["node 3 (partition unknown)"]
    assert "non-finite" in causes["node 4 (partition unknown)"]
    assert "float64" in causes["node 5 (partition unknown)"]
    assert all(torch.equal(cloud.adapters[k], good[k]) for k in good)  # the one good reply alone
    # a round with no valid reply leaves the adapters exactly as they were
    strategy = OffsiteStrategy(OffsiteCloud(cfg, off), cfg)
    assert not strategy.train_round(_ScriptedGrid({4: with_nan, 5: float64}), 1, [4, 5])
    assert all(torch.equal(strategy.cloud.adapters[k], start[k]) for k in start) and strategy.cloud.steps == 0
    with pytest.raises(Exception, match="offsite.local-steps=9"):
        parse_train_reply(_reply(good, 10, steps=9), cloud.spec, local_steps=2)


# -- one short federation through the ClientApp's own handlers ----------------------------------------


def test_offsite_rounds_through_the_clientapp_train_and_measure_accuracy(tmp_path):
    from tests.test_strategy import Grid

    cfg = RunConfig(protocol="offsite", offsite_method="fedbiot", max_examples=400, batch_size=8, local_steps=4,
                    devices_per_round=3, min_devices=3, num_rounds=2, max_length=32, eval_examples=12, distill_steps=4,
                    learning_rate=5e-3, timeout=60.0, defense="none")
    cloud = OffsiteCloud(cfg)
    start = cloud.trainable_state()
    off = cloud.offsite
    assert off.report["parameter-ratio"] < 0.9 and off.report["block-parameter-ratio"] == pytest.approx(4 / 6)

    # the starting adapters' accuracy on the same test shares, for the record
    from privtune_flwr import data

    test = data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=cfg.max_examples).test
    shares = [data.partition(test, 4, p, partitioner="iid", seed=cfg.seed) for p in range(4)]
    rows = [s.select(range(min(len(s), cfg.eval_examples))) for s in shares]
    off.load_adapters(start)
    before = offsite.score(off, sum((list(r["text"]) for r in rows), []), sum((list(r["label"]) for r in rows), []),
                           emulator=False, max_length=cfg.max_length)["accuracy"]

    grid = Grid(cfg, 4)
    # without its owner's consent a device sends no adapters (they carry no bound)
    first = RecordDict({offsite.CONFIG: ConfigRecord({"server-round": 1, "num-batches": 1}),
                        offsite.ADAPTERS: offsite.adapters_record(start)})
    refused = grid.send_and_receive([Message(content=first, message_type=MessageType.TRAIN, dst_node_id=1)])[0]
    assert refused.has_error() and "refuses federation.protocol='offsite'" in refused.error.reason
    assert "allow-offsite=true" in refused.error.reason
    for context in grid.contexts.values():
        context.node_config["allow-offsite"] = True
    strategy = OffsiteStrategy(cloud, cfg, output_dir=tmp_path)
    strategy.start(grid)
    assert [r["round"] for r in strategy.history] == [1, 2]
    last = strategy.history[-1]
    print(f"\noffsite fedbiot MiniLM: test accuracy {before:.3f} before, "
          f"{[round(r['test-accuracy'], 3) for r in strategy.history]} after rounds 1, 2; emulator "
          f"{[round(r['emulator-test-accuracy'], 3) for r in strategy.history]}; ratio {off.report['parameter-ratio']:.3f}")
    assert 0 <= last["test-accuracy"] <= 1 and 0 <= last["emulator-test-accuracy"] <= 1
    assert last["test-num-examples"] == sum(len(r) for r in rows)
    assert last["train-loss"] > 0 and last["valid-replies"] == 3 and not strategy.rejected.entries
    assert last["bytes-sent"] == off.adapter_bytes() * 3 == last["bytes-received"]
    assert cloud.steps == 2 and any(not torch.equal(cloud.adapters[k], start[k]) for k in start)
    assert (tmp_path / "checkpoints" / "round-002.pt").exists()

    # a device refuses adapters that are not finite, before using them
    bad = cloud.trainable_state()
    next(iter(bad.values())).view(-1)[0] = float("inf")
    content = RecordDict({offsite.CONFIG: ConfigRecord({"server-round": 3, "num-batches": 1}),
                          offsite.ADAPTERS: offsite.adapters_record(bad)})
    reply = grid.send_and_receive([Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)])[0]
    assert reply.has_error() and "refused the adapters sent" in reply.error.reason and "non-finite" in reply.error.reason

    # the dropout masks come from the device's own entropy, not from seeds the cloud knows: the same
    # instruction twice gives two different updates (the batches and starting adapters are the same)
    def same():
        content = RecordDict({offsite.CONFIG: ConfigRecord({"server-round": 3, "num-batches": 1}),
                              offsite.ADAPTERS: offsite.adapters_record(cloud.trainable_state())})
        reply = grid.send_and_receive([Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)])[0]
        assert not reply.has_error()
        return offsite.read_adapters(reply.content.array_records[offsite.ADAPTERS], off.adapter_spec())

    first, second = same(), same()
    assert any(not torch.equal(first[k], second[k]) for k in first)
