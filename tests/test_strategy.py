"""The cloud's round loop, in-process with real ClientApps: retries, dropouts, faults, resume,
and the u-shaped protocol end to end."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, RecordDict

from privtune_flwr import client_app as device_app
from privtune_flwr import device_ushaped
from privtune_flwr.cloud import CloudSide, MiddleSide
from privtune_flwr.config import RunConfig
from privtune_flwr.models import load_split
from simulations.faults import FaultPlan, faulty_app
from strategies import RoundFailed, SplitLearningStrategy, UShapedStrategy

NODE = {"allowed-defenses": "*", "max-epsilon": float("inf"), "key-store": "memory", "allow-reproducible-noise": True}


class Grid:
    """Delivers messages straight to each device's ClientApp, as the simulation engine would;
    ``drop`` takes a device off the federation (it stops answering and leaves the node list)."""

    def __init__(self, cfg: RunConfig, devices: int, app=None):
        self.app = device_app.app if app is None else app  # a faulty app: simulations.faults
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": devices, **NODE},
                                    state=RecordDict(), run_config=cfg.to_flower()) for n in range(1, devices + 1)}
        self.gone: set[int] = set()
        self.sent = 0

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.gone]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent += 1
            node = m.metadata.dst_node_id
            if node in self.gone:
                reply = Message(Error(code=0, reason="no reply within the round's timeout"), reply_to=m)
            else:
                try:
                    reply = self.app(m, self.contexts[node])
                except Exception as exc:  # noqa: BLE001 - Flower turns a ClientApp's exception into an error reply
                    reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _cfg(**kw):
    base = dict(max_examples=400, batch_size=4, batches_per_round=2, devices_per_round=3, min_devices=3, num_rounds=2,
                max_length=24, audit_tokens=0, defense="dchi", epsilon=64.0, eval_examples=6, reproducible_noise=True,
                timeout=30.0, round_retries=1)
    base.update(kw)
    return RunConfig(**base)


def _vanilla(cfg, out=None):
    torch.manual_seed(cfg.seed)  # as the ServerApp seeds the cloud (dropout in the top)
    split = load_split("minilm", 1, num_labels=2, lora_rank=4, seed=cfg.seed)
    return SplitLearningStrategy(CloudSide(split, learning_rate=1e-3, batch_size=cfg.batch_size), cfg, output_dir=out)


def test_round_loop_trains_evaluates_and_checkpoints(tmp_path, minilm_split):
    cfg = _cfg()
    strategy = _vanilla(cfg, tmp_path)
    strategy.start(Grid(cfg, 4))
    assert [r["round"] for r in strategy.history] == [1, 2]
    assert all("train-loss" in r and 0 <= r["test-accuracy"] <= 1 for r in strategy.history)
    assert strategy.cloud.steps == 2 * 3 * 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]
    assert json.loads((tmp_path / "history.json").read_text())[-1]["round"] == 2


def test_resume_equals_the_uninterrupted_run(tmp_path, minilm_split):
    """Stop after round 1 (as a killed run would), resume from its folder: round 2 comes out as the
    uninterrupted run's round 2, weights and metrics alike."""
    cfg = _cfg()
    whole = _vanilla(cfg, tmp_path / "whole")
    whole.start(Grid(cfg, 4))
    first = _vanilla(cfg, tmp_path / "killed")
    first.start(Grid(cfg, 4), num_rounds=1)
    resumed = _vanilla(cfg, tmp_path / "resumed")
    assert resumed.resume(tmp_path / "killed") == 1
    resumed.start(Grid(cfg, 4))
    assert [r["round"] for r in resumed.history] == [1, 2]
    for key in ("train-loss", "test-accuracy", "test-loss"):
        assert resumed.history[1][key] == pytest.approx(whole.history[1][key], abs=1e-6), key
    mine, theirs = resumed.cloud.split.trainable_state(), whole.cloud.split.trainable_state()
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        _vanilla(cfg).resume(tmp_path / "nowhere")


def test_lost_devices_are_counted_and_the_run_goes_on(minilm_split):
    cfg = _cfg(num_rounds=2, min_devices=2, devices_per_round=3)
    grid = Grid(cfg, 4)
    strategy = _vanilla(cfg)
    train = strategy.train_round

    def train_round(grid_, server_round, sample):
        if server_round == 2:  # a device dies in the middle of round 2
            grid.gone.add(sample[0])
        return train(grid_, server_round, sample)

    strategy.train_round = train_round
    strategy.start(grid)
    assert [r["round"] for r in strategy.history] == [1, 2]
    assert "test-accuracy" in strategy.history[1]
    assert strategy.devices_lost == 1
    assert sum(e["round"] == 2 and e["phase"] == "train" for e in strategy.rejected.entries) == 1


def test_a_round_short_of_replies_is_retried_then_the_run_fails(minilm_split):
    cfg = _cfg(min_replies=3, devices_per_round=3, min_devices=3, round_retries=2)
    grid = Grid(cfg, 3, faulty_app(FaultPlan(fraction=1.0, kinds=("raise",))))
    strategy = _vanilla(cfg)
    with pytest.raises(RoundFailed, match="round 1 had fewer than federation.min-replies=3 usable replies in 3 attempts"):
        strategy.start(grid)
    assert grid.sent >= 3 * 3  # three attempts, each to every sampled device
    assert strategy.cloud.steps == 0
    assert {e["cause"].split(":")[0] for e in strategy.rejected.entries} == {"device error"}


def test_faulty_devices_are_survived_counted_by_kind_and_change_nothing_else(minilm_split):
    """Two of five devices misbehave (one raises, one sends NaN, every round): training completes,
    the failures are counted by kind, and the top ends exactly where a run without those two
    devices' replies ends (nothing of theirs reached the weights). The accuracy of a clean run
    against one with 20% faulty devices is measured by ``simulations.faults`` (README)."""
    common = dict(devices_per_round=5, min_devices=5, num_rounds=2)
    cfg = _cfg(**common)
    faulty = _vanilla(cfg)
    faulty.start(Grid(cfg, 5, faulty_app(FaultPlan(fraction=0.4, kinds=("raise", "nan")))))
    causes = [e["cause"] for e in faulty.rejected.entries]
    assert sum("injected fault" in c for c in causes) == 2 and sum("non-finite" in c for c in causes) == 2
    assert all(e["device"] in ("device 0", "device 1") for e in faulty.rejected.entries)
    assert faulty.cloud.steps == 2 * 3 * 2  # three sound devices x two rounds x two batches

    clean_cfg = _cfg(**common)
    reference = _vanilla(clean_cfg)
    grid = Grid(clean_cfg, 5)
    deliver = grid.send_and_receive

    def without_faulty(messages, *, timeout=None):  # the same run with devices 0 and 1 silent in training
        replies = deliver(messages, timeout=timeout)
        return [r for r in replies if not (r.metadata.src_node_id in (1, 2) and r.metadata.message_type == "train")]

    grid.send_and_receive = without_faulty
    reference.start(grid)
    mine, theirs = faulty.cloud.split.trainable_state(), reference.cloud.split.trainable_state()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert faulty.history[-1]["test-accuracy"] == reference.history[-1]["test-accuracy"]


@pytest.mark.parametrize("middle_steps", ["per-batch", "joint"])
def test_u_shaped_rounds_keep_labels_on_the_devices(minilm_split, middle_steps):
    cfg = _cfg(protocol="u-shaped", num_rounds=2, middle_steps=middle_steps)
    split = load_split("minilm", 1, num_labels=2, lora_rank=4, protocol="u-shaped", seed=cfg.seed)
    before = {k: v.clone() for k, v in split.trainable_state().items()}
    strategy = UShapedStrategy(MiddleSide(split, learning_rate=1e-3), cfg)
    grid = Grid(cfg, 4)
    strategy.start(grid)
    assert [r["round"] for r in strategy.history] == [1, 2]
    last = strategy.history[-1]
    assert 0 <= last["test-accuracy"] <= 1 and last["train-loss"] > 0
    # 2 rounds x 2 exchanges; per-batch: one middle step per device batch (3 devices), as vanilla
    per_exchange = 3 if middle_steps == "per-batch" else 1
    assert strategy.cloud.steps == 2 * 2 * per_exchange
    assert last["messages-per-step"] == pytest.approx(4 * 3 / per_exchange)  # forward and head, there and back, per device
    assert any(not torch.equal(before[k], v) for k, v in split.trainable_state().items())
    assert not strategy.cloud.pending  # no graph outlives its step
    # each device trained its own head, kept in its own state
    heads = [c.state.array_records[device_ushaped.HEAD] for c in grid.contexts.values() if device_ushaped.HEAD in c.state.array_records]
    assert len(heads) == 4


def test_a_device_asked_for_the_first_time_gets_the_setup_timeout(minilm_split):
    """A device sets up on its first train or evaluate message (it fits its defence then), so a
    round that asks one for the first time waits setup-timeout; later rounds wait timeout."""
    cfg = _cfg(num_rounds=2, devices_per_round=2, min_devices=3, timeout=30.0, setup_timeout=90.0)
    waits = []

    class Recording(Grid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type != "query":
                waits.append((messages[0].metadata.message_type, len(messages), timeout))
            return super().send_and_receive(messages, timeout=timeout)

    strategy = _vanilla(cfg)
    strategy.start(Recording(cfg, 3))
    # round 1: two devices train (new), then all three evaluate (the third is new); round 2: all known
    assert waits == [("train", 2, 90.0), ("evaluate", 3, 90.0), ("train", 2, 30.0), ("evaluate", 3, 30.0)]
    # a setup-timeout below timeout never shortens the wait
    waits.clear()
    strategy = _vanilla(_cfg(num_rounds=1, devices_per_round=2, min_devices=3, timeout=30.0, setup_timeout=5.0))
    strategy.start(Recording(cfg, 3))
    assert [w[2] for w in waits] == [30.0, 30.0]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="federation.setup-timeout"):
            RunConfig(setup_timeout=bad)


def test_a_u_shaped_device_refuses_outputs_outside_its_range_and_keeps_its_head(minilm_split):
    """Through the ClientApp's own handlers: a "train.head" carrying 1e38 or NaN gets an error reply
    naming the value and the accepted range; the device's stored head (weights, optimiser state)
    and its pending release are as they were, and an in-range step afterwards trains."""
    from flwr.app import Message

    from privtune_flwr import schema

    cfg = _cfg(protocol="u-shaped")
    grid = Grid(cfg, 1)
    state = grid.contexts[1].state

    def ask(kind, step, outputs=None):
        reply = grid.send_and_receive([Message(content=schema.step_instruction(1, step, outputs), message_type=kind,
                                               dst_node_id=1)])[0]
        return reply

    def head_record():
        record = state.array_records.get(device_ushaped.HEAD)
        return None if record is None else {k: v.numpy().copy() for k, v in record.items()}

    for step in range(2):
        released = schema.parse_release(ask("train.forward", step).content, schema.Plan(384, 0, cfg.batch_size, cfg.max_length))
        shape = tuple(released.hidden.shape)
        stored = head_record()
        for value, needle in ((1e38, "outputs hold values up to 1e+38; accepted: finite values with |value| <= "),
                              (float("nan"), f"outputs hold non-finite values: {shape[0] * shape[1] * shape[2]} of")):
            reply = ask("train.head", step, torch.full(shape, value))
            assert reply.has_error() and needle in reply.error.reason, reply.error.reason
            now = head_record()
            assert (stored is None and now is None) or all((now[k] == v).all() for k, v in stored.items())
            assert state.config_records[device_ushaped.PENDING]["step"] == step  # still awaiting its outputs
        reply = ask("train.head", step, torch.randn(shape, generator=torch.Generator().manual_seed(step)))
        assert not reply.has_error()
        grad, metrics = schema.parse_gradient(reply.content, shape)
        assert torch.isfinite(grad).all() and metrics["loss"] > 0 and head_record() is not None


def test_more_devices_than_training_rows_stop_the_run_before_any_release(minilm_split):
    """A bundled corpus is public, so the cloud counts its training rows as the devices cut them:
    a federation that would leave a device without one stops before the first instruction, with
    the numbers and what would work."""
    cfg = _cfg(max_examples=4, min_devices=2, devices_per_round=2, batch_size=1, batches_per_round=1)  # 4 training rows
    grid = Grid(cfg, 5)
    strategy = _vanilla(cfg)
    with pytest.raises(ValueError, match=r"^5 devices share the 4 training rows of 'rotten_tomatoes': each device needs at "
                                         r"least one; accepted: at most 4 devices"):
        strategy.start(grid)
    assert grid.sent == 5  # the identity queries alone: no device was asked to release
    assert strategy.history == []
    # as many devices as rows: the run goes on
    cfg = _cfg(max_examples=4, min_devices=2, devices_per_round=2, batch_size=1, batches_per_round=1, num_rounds=1,
               eval_examples=1)
    strategy = _vanilla(cfg)
    strategy.start(Grid(cfg, 4))
    assert [r["round"] for r in strategy.history] == [1]


def test_the_bytes_the_cloud_counts_follow_the_transport_dtype(minilm_split):
    """What arrived is counted in the dtype it travelled in: float16 representations are half the
    bytes of float32 ones (the int8 mask and int64 labels are the same)."""
    seen = {}
    for transport in ("float32", "float16"):
        cfg = _cfg(num_rounds=1, transport_dtype=transport, devices_per_round=2, min_devices=2)
        strategy = _vanilla(cfg)
        strategy.start(Grid(cfg, 2))
        seen[transport] = strategy.history[0]
    a, b = seen["float32"], seen["float16"]
    n = a["num-examples"]
    assert n == b["num-examples"] == 2 * 2 * 4
    # same sample, same batches, same shapes: a = 4C + M + 8n and b = 2C + M + 8n, where C is the
    # coordinates (examples x tokens x 384) and M the mask's bytes (examples x tokens)
    coordinates = (a["bytes-received"] - b["bytes-received"]) / 2
    mask = a["bytes-received"] - 4 * coordinates - 8 * n
    assert coordinates > 0 and coordinates % 384 == 0 and mask == coordinates / 384
