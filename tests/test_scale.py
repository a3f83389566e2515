"""What grows with the federation: the devices one process keeps, the bottom it loads, and the
devices the cloud asks to evaluate."""

from __future__ import annotations

import pytest

from privtune_flwr import client_app as device_app
from privtune_flwr.config import RunConfig


def _cfg(**kw):
    base = dict(max_examples=120, batch_size=2, batches_per_round=1, max_length=16, audit_tokens=0, defense="dchi",
                epsilon=50.0, eval_examples=2, devices_per_round=2, min_devices=2, split_layer=1, num_rounds=4)
    base.update(kw)
    return RunConfig(**base)


def test_a_process_loads_the_bottom_once_and_keeps_a_bounded_number_of_devices(monkeypatch, minilm_split):
    loads = []
    real = device_app.load_split

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(device_app, "load_split", counting)
    monkeypatch.setattr(device_app, "_SPLITS", {})
    monkeypatch.setattr(device_app, "_NODES", type(device_app._NODES)())
    monkeypatch.setattr(device_app, "NODE_CACHE", 3)
    cfg = _cfg()
    nodes = [device_app.load_node(cfg, pid, 8) for pid in range(8)]
    assert len(loads) == 1  # eight devices, one bottom
    assert len(device_app._NODES) == 3 and [k[1] for k in device_app._NODES] == [5, 6, 7]
    assert all(n.device.split is nodes[0].device.split for n in nodes)
    device_app.load_node(cfg, 5, 8)  # a hit moves it to the end; a new device evicts the oldest
    device_app.load_node(cfg, 0, 8)
    assert [k[1] for k in device_app._NODES] == [7, 5, 0] and len(loads) == 1
    assert device_app.load_node(cfg, 0, 8).train["text"] == nodes[0].train["text"]  # rebuilt the same


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
    with pytest.raises(ValueError, match="eval-devices=-1"):
        _cfg(eval_devices=-1)
