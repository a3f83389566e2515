"""What grows with the federation: the devices one process keeps, the bottom it loads, and the
devices the cloud asks to evaluate."""

from __future__ import annotations

import pytest

from privtune_flwr import client_app as device_app
from privtune_flwr import device_runtime as runtime
from privtune_flwr.config import RunConfig


def _cfg(**kw):
    base = dict(max_examples=120, batch_size=2, batches_per_round=1, max_length=16, audit_tokens=0, defense="dchi",
                epsilon=50.0, eval_examples=2, devices_per_round=2, min_devices=2, split_layer=1, num_rounds=4)
    base.update(kw)
    return RunConfig(**base)


def test_a_process_loads_the_bottom_once_and_keeps_a_bounded_number_of_devices(monkeypatch, minilm_split):
    loads = []
    real = runtime.load_split

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "load_split", counting)
    from privtune_flwr.resources import ResourceCache

    cache = ResourceCache()  # a fresh process, whose node shelf holds 3
    cache.set_limit("node", 3)
    monkeypatch.setattr(runtime.RUNTIME, "resources", cache)
    cfg = _cfg()
    nodes = [runtime.load_node(cfg, pid, 8) for pid in range(8)]
    assert len(loads) == 1  # eight devices, one bottom
    assert len(cache.keys("node")) == 3 and [k[1] for k in cache.keys("node")] == [5, 6, 7]
    assert all(n.device.split is nodes[0].device.split for n in nodes)
    runtime.load_node(cfg, 5, 8)  # a hit moves it to the end; a new device evicts the oldest
    runtime.load_node(cfg, 0, 8)
    assert [k[1] for k in cache.keys("node")] == [7, 5, 0] and len(loads) == 1
    assert runtime.load_node(cfg, 0, 8).train["text"] == nodes[0].train["text"]  # rebuilt the same


def test_evaluation_samples_devices_and_the_last_round_asks_every_one(minilm_split):
    from privtune_flwr.cloud import CloudSide
    from strategies import SplitLearningStrategy

    def strategy(cfg):
        return SplitLearningStrategy(CloudSide(minilm_split, learning_rate=1e-3, batch_size=2), cfg)

    nodes = list(range(101, 111))
    every = strategy(_cfg())
    assert [every.evaluation_sample(nodes, r) for r in (1, 4)] == [nodes, nodes]
    some = strategy(_cfg(eval_devices=3))
    rounds = [some.evaluation_sample(nodes, r) for r in (1, 2, 3)]
    assert all(len(r) == 3 and set(r) <= set(nodes) for r in rounds) and len({tuple(r) for r in rounds}) > 1
    assert some.evaluation_sample(nodes, 4) == nodes  # final-eval-all: each device once at the end
    assert strategy(_cfg(eval_devices=3)).evaluation_sample(nodes, 2) == rounds[1]  # seeded by the round
    assert strategy(_cfg(eval_devices=3, final_eval_all=False)).evaluation_sample(nodes, 4) != nodes
    # the training sample stream is the same whatever evaluation samples
    trains = []
    for s in (strategy(_cfg()), strategy(_cfg(eval_devices=3))):
        trains.append([(s.sample(nodes, r), s.evaluation_sample(nodes, r))[0] for r in (1, 2, 3)])
    assert trains[0] == trains[1]
    with pytest.raises(ValueError, match="federation.eval-devices=-1"):
        _cfg(eval_devices=-1)


def test_more_devices_than_test_rows_share_the_test_split_round_the_devices(minilm_split):
    from privtune_flwr import data

    cfg = _cfg(max_examples=1000)
    rows = len(data.load_dataset(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, max_examples=1000).test)
    total = rows + 7  # more devices than test rows (and fewer than training rows)
    first, wrapped = runtime.load_node(cfg, 1, total), runtime.load_node(cfg, rows + 1, total)
    assert len(first.test) == 1 and wrapped.test["text"] == first.test["text"]  # share (rows + 1) % rows = 1
    assert set(first.train["text"]).isdisjoint(wrapped.train["text"])  # training data is never shared
    tests = [t for pid in range(rows) for t in runtime.load_node(cfg, pid, total).test["text"]]
    assert len(tests) == rows  # every test row is exactly one of the first `rows` devices'


def test_float16_transport_halves_the_bytes_and_rounds_only(minilm_split):
    import numpy as np
    import torch

    from privtune_flwr import config, schema

    assert tuple(schema.TRANSPORT_DTYPES) == config.TRANSPORT_DTYPES
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 384) * 4
    hidden[0, 4:] = 0  # padding
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 4:] = 0
    labels = torch.tensor([0, 1, 1])
    metrics = {"num-examples": 3.0, "num-tokens": float(mask.sum())}
    wide = schema.release_content(hidden, mask, labels, metrics)
    half = schema.release_content(hidden, mask, labels, metrics, transport="float16")
    size = lambda c: len(c.array_records[schema.RELEASED][schema.HIDDEN].data)  # noqa: E731
    assert size(half) - 128 < (size(wide) - 128) / 2 + 64  # payload halves (npy headers aside)
    plan16 = schema.Plan(384, 2, 4, 8, transport="float16")
    got = schema.parse_release(half, plan16)
    assert got.hidden.dtype == torch.float32
    assert torch.equal(got.hidden, hidden.half().float())  # exactly the rounding, nothing else
    assert float((got.hidden - hidden).abs().max()) <= float(hidden.abs().max()) * 2**-11
    with pytest.raises(schema.SchemaError, match="dtype"):
        schema.parse_release(half, schema.Plan(384, 2, 4, 8))  # a float32 plan refuses float16
    with pytest.raises(schema.SchemaError, match="dtype"):
        schema.parse_release(wide, plan16)
    with pytest.raises(ValueError, match="exceeds float16's range"):
        schema.release_content(hidden * 1e5, mask, labels, metrics, transport="float16")
    with pytest.raises(ValueError, match="federation.transport-dtype='bf16'"):
        schema.release_content(hidden, mask, labels, metrics, transport="bf16")
    with pytest.raises(ValueError, match="federation.transport-dtype='bf16'"):
        _cfg(transport_dtype="bf16")
    assert np.dtype("float16").itemsize * 2 == np.dtype("float32").itemsize


def test_a_device_served_by_another_actor_restores_its_label_map_instead_of_fitting_again(monkeypatch, minilm_split):
    """The default defence fits the device's label map once per run, not once per Ray actor that
    serves the device: the map lives in its context.state, a fresh process cache restores it, and
    the release from the restored map is bit-identical to the one from the fit. A map stored for
    other fit inputs (another rank) is refitted, not reused."""
    import torch
    from flwr.app import RecordDict

    from privtune_flwr import device as device_module

    fits = []
    real = device_module.device_subspace

    def counting(*args, **kwargs):
        fits.append(kwargs.get("rank"))
        return real(*args, **kwargs)

    monkeypatch.setattr(device_module, "device_subspace", counting)
    cfg = _cfg(defense="label-subspace", epsilon=64.0, max_examples=80, subspace_fit="closed-form")
    state = RecordDict()
    runtime.RUNTIME.resources.clear("node")
    first = runtime.load_node(cfg, 0, 2, state)
    assert len(fits) == 1 and runtime.FITTED in state.array_records
    runtime.RUNTIME.resources.clear("node")  # another actor: an empty node cache
    again = runtime.load_node(cfg, 0, 2, state)
    assert len(fits) == 1  # restored, not refitted
    assert first.defense.mechanism_config() == again.defense.mechanism_config()
    again.defense.key = first.defense.key  # the device's key (set per message from its key store)
    texts = list(first.train["text"][:3])
    enc = first.device.encode(texts)
    a, b = first.device.release_ids(enc, [0, 1, 0]), again.device.release_ids(enc, [0, 1, 0])
    assert torch.equal(a.hidden, b.hidden)
    runtime.RUNTIME.resources.clear("node")
    runtime.load_node(_cfg(defense="label-subspace", epsilon=64.0, max_examples=80, subspace_fit="closed-form",
                              subspace_rank=1), 0, 2, state)
    assert fits == [2, 1]


def test_the_scaling_rows_split_a_steady_round_into_device_cloud_and_the_rest():
    """``simulations.scaling`` turns a run's results into a row: the training replies' seconds are
    summed over the sampled devices and shared over the actors that run at once, the first round
    beyond a steady one is the set-up, and the parts never exceed the round."""
    from types import SimpleNamespace

    from simulations import scaling

    args = SimpleNamespace(sampled=4, actors=2, batch=2, dataset="movie_reviews", defense="dchi")
    steady = {"round-seconds": 2.0, "num-examples": 8.0, "test-num-examples": 8.0, "bottom-seconds": 0.2,
              "defense-seconds": 0.1, "serialise-seconds": 0.05, "cloud-seconds": 0.3, "bytes-received": 800.0,
              "test-bytes-received": 800.0}
    results = {"rounds": [{**steady, "round-seconds": 9.0}, steady, {**steady, "round-seconds": 2.2}, {**steady, "round-seconds": 1.8}]}
    row = scaling.summarise(1000, args, results, "peak memory of all run processes 3.50 GB", 30.0)
    assert row["round_seconds"] == 2.0 and row["first_round_seconds"] == 9.0 and row["setup_seconds"] == 7.0
    split = row["split_seconds"]
    # 4 replies of 0.2 s of bottom each, two at a time: 0.4 s of the round
    assert split["device-bottom"] == pytest.approx(0.4) and split["device-defence"] == pytest.approx(0.2)
    assert split["device-serialise"] == pytest.approx(0.1) and split["cloud-training"] == 0.3
    assert sum(split.values()) == pytest.approx(2.0)
    assert row["peak_rss_mb"] == pytest.approx(3.5 * 1024) and row["bytes_per_sample"] == pytest.approx(100.0)
    assert row["calls_per_second"] == pytest.approx(8 / 2.0)
