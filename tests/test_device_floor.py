"""The device's floor over what the cloud chooses: the work of one instruction, the model, the
records an instruction may carry, and no fault switch in the run config."""

from __future__ import annotations

import hashlib

import numpy as np

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

from privtune_flwr import client_app as device_app
from privtune_flwr import device_runtime as runtime
from privtune_flwr import schema
from privtune_flwr.config import RunConfig
from privtune_flwr.device_policy import DevicePolicy, PolicyError, weights_digest

PERMISSIVE = {"allowed-defenses": "*", "max-epsilon": float("inf"), "key-store": "memory"}


def _cfg(**kw):
    base = dict(max_examples=40, batch_size=4, batches_per_round=2, max_length=24, audit_tokens=0, defense="dchi",
                epsilon=50.0, eval_examples=6, devices_per_round=2, min_devices=2, split_layer=1)
    base.update(kw)
    return RunConfig(**base)


def _device(cfg, pid=0, **node):
    node_config = {"partition-id": pid, "num-partitions": 2, **PERMISSIVE, **node}
    return Context(run_id=1, node_id=pid + 1, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())


def _message(kind, content):
    msg = Message(content=content, message_type=kind, dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def test_one_instruction_cannot_ask_for_unbounded_work(minilm_split):
    """Examples per instruction and tokens per example are capped before anything is loaded or
    released, and a release that runs past its time is stopped before anything is sent."""
    policy = DevicePolicy.from_sources({}, env={})
    with pytest.raises(PolicyError, match="model.max-length=512 tokens per example.*max-tokens-per-example"):
        policy.check(RunConfig(max_length=512))
    cfg = _cfg(batch_size=600)
    runtime.RUNTIME.resources.clear("node")
    with pytest.raises(PolicyError, match=r"1200 examples in one instruction \(2 batches of 600\).*at most 1024"):
        device_app.app(_message(MessageType.TRAIN, schema.instruction(1, 2)), _device(cfg))
    assert not runtime.RUNTIME.resources.keys("node")  # refused before the device built anything
    small = {"max-examples-per-instruction": 5}
    with pytest.raises(PolicyError, match=r"6 examples in one instruction \(6 test examples\).*at most 5"):
        device_app.app(_message(MessageType.EVALUATE, schema.instruction(1, 0)), _device(_cfg(), **small))
    with pytest.raises(PolicyError, match="max-examples-per-instruction"):
        device_app.app(_message(MessageType.TRAIN, schema.instruction(1, 2)), _device(_cfg(), **small))  # 8 > 5
    device_app.app(_message(MessageType.TRAIN, schema.instruction(1, 1)), _device(_cfg(), **small))  # 4 fit
    with pytest.raises(TimeoutError, match="max-instruction-seconds"):
        device_app.app(_message(MessageType.EVALUATE, schema.instruction(1, 0)),
                       _device(_cfg(), **{"max-instruction-seconds": 1e-9}))
    for bad, match in (({"max-examples-per-instruction": 0}, "must be an integer >= 1"),
                       ({"max-tokens-per-example": 1}, "must be an integer >= 2"),
                       ({"max-instruction-seconds": 0.0}, r"outside the accepted range \(0, inf\]"),
                       ({"max-releases-per-example": 0}, "must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            DevicePolicy.from_mapping(bad)


def test_the_device_runs_only_the_models_it_agreed_to(tmp_path):
    default = DevicePolicy.from_sources({}, env={})
    default.check(RunConfig(model="minilm", defense="dchi", split_layer=1))
    default.check(RunConfig(model="smollm2", defense="dchi", split_layer=2, task="generation", protocol="u-shaped"))
    with pytest.raises(PolicyError, match="model.split-layer=1 for model.name='smollm2': its floor for that model is 2"):
        default.check(RunConfig(model="smollm2", defense="dchi", split_layer=1, task="generation", protocol="u-shaped"))
    with pytest.raises(PolicyError, match="model.name='roberta-base'.*allow-hub-models=true"):
        default.check(RunConfig(model="roberta-base", defense="dchi"))
    DevicePolicy.from_mapping({"allow-hub-models": True}).check(RunConfig(model="roberta-base", defense="dchi"))
    DevicePolicy.from_mapping({"min-split-layer": 0}).check(RunConfig(defense="dchi", split_layer=0))  # its own choice

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights v1")
    (folder / "config.json").write_text("{}")
    local = RunConfig(model=str(folder), defense="dchi")
    with pytest.raises(PolicyError, match="refuses model.name=.*my-model.*allowed-models"):
        default.check(local)
    DevicePolicy.from_mapping({"allowed-models": f"minilm,{folder}"}).check(local)
    DevicePolicy.from_mapping({"allowed-models": "*"}).check(local)
    with pytest.raises(PolicyError, match="allow-hub-models"):  # '*' is about local folders, not downloads
        DevicePolicy.from_mapping({"allowed-models": "*"}).check(RunConfig(model="org/model", defense="dchi"))
    expected = hashlib.sha256(b"model.safetensors\0weights v1").hexdigest()
    assert weights_digest(folder) == expected
    by_digest = DevicePolicy.from_mapping({"allowed-models": f"sha256:{expected}"})
    by_digest.check(local)
    (folder / "model.safetensors").write_bytes(b"weights v2, swapped by the cloud")
    with pytest.raises(PolicyError, match="allowed-models"):
        by_digest.check(local)
    with pytest.raises(PolicyError, match="model.name='minilm'"):
        by_digest.check(RunConfig(defense="dchi", split_layer=1))  # only what the list names
    floors = DevicePolicy.from_mapping({"allowed-models": "*", "min-split-layers": f"smollm2:2,{folder}:4"})
    with pytest.raises(PolicyError, match="model.split-layer=3 for model.name=.*its floor for that model is 4"):
        floors.check(RunConfig(model=str(folder), defense="dchi", split_layer=3))
    with pytest.raises(ValueError, match="min-split-layers='smollm2' is not a list of model:floor pairs"):
        DevicePolicy.from_mapping({"min-split-layers": "smollm2"})


def test_a_refused_value_is_printed_exactly():
    with pytest.raises(PolicyError, match=r"defense.epsilon=64\.000001: its floor is max-epsilon=64\.0"):
        DevicePolicy.from_sources({}, env={}).check(RunConfig(epsilon=64.000001))


def test_an_instruction_carrying_more_than_its_schema_is_refused(minilm_split):
    cfg = _cfg()
    extra_record = schema.instruction(1, 1)
    extra_record["smuggled"] = ArrayRecord({"x": Array(np.zeros(1, np.float32))})
    extra_key = schema.instruction(1, 1)
    extra_key.config_records[schema.CONFIG]["fault-fraction"] = 1.0
    for content, match in ((extra_record, r"records \['smuggled'\]"), (extra_key, r"unexpected keys \['fault-fraction'\]")):
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            with pytest.raises(schema.SchemaError, match=match):
                device_app.app(_message(kind, content), _device(cfg))
    with pytest.raises(schema.SchemaError, match="identity query carries records"):
        device_app.app(_message(MessageType.QUERY, schema.instruction(1, 1)), _device(cfg))
    ok = device_app.app(_message(MessageType.QUERY, RecordDict()), _device(cfg))
    assert schema.read_device_identity(ok.content) == 0  # partition 0


def test_the_run_config_cannot_switch_on_faults(monkeypatch):
    """Fault injection is a device-side Mod (simulations.faults); the run config has no key for it,
    and the product's ClientApp attaches no mod, whatever the device's environment says."""
    for key in ("fault-fraction", "fault-kinds", "fault-delay"):
        with pytest.raises(ValueError, match=f"{key} is no longer a run-config key.*simulations.faults"):
            RunConfig.from_flower({key: 1.0})
    assert device_app.app._mods == []
    from simulations.faults import FaultPlan

    monkeypatch.setenv("PRIVTUNE_FAULTS", "fraction=0.5 kinds='raise,slow' delay=2")
    plan = FaultPlan.from_env()
    assert plan == FaultPlan(0.5, ("raise", "slow"), 2.0)
    assert [plan.fault_of(p, 4) for p in range(4)] == ["raise", "slow", None, None]
    for text, match in (("fraction=2", r"fraction=2.0 is outside"), ("kinds='melt'", "kinds='melt'"), ("speed=1", "unknown keys")):
        monkeypatch.setenv("PRIVTUNE_FAULTS", text)
        with pytest.raises(ValueError, match=match):
            FaultPlan.from_env()


def test_an_error_the_superlink_writes_for_a_lost_device_names_that_device():
    """A lost SuperNode's error reply comes from the SuperLink (node id 1): the progress grid books
    it against the device it was sent to."""
    from strategies.reporting import ProgressGrid

    from tests.conftest import LinkGrid

    class LostLink(LinkGrid):
        def pull_messages(self, ids):
            out = []
            for i in ids:
                reply = Message(Error(code=0, reason="node unavailable"), reply_to=self.sent[i])
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id
                out.append(reply)
            return out

    msgs = [Message(content=schema.instruction(1, 1), message_type=MessageType.TRAIN, dst_node_id=n) for n in (7, 9)]
    replies = ProgressGrid(LostLink()).send_and_receive(msgs, timeout=5)
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 9]
    assert all(r.has_error() and r.error.reason == "node unavailable" for r in replies)
