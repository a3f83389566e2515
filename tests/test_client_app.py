"""The device (ClientApp) and the cloud (strategy) exchanging real Flower Messages in-process."""

import json

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict

from privtune_flwr import schema
from privtune_flwr.client_app import app as client_app, partition_ids
from privtune_flwr.config import RunConfig
from privtune_flwr.models import load_split
from privtune_flwr.cloud import CloudSide
from strategies import SplitLearningStrategy

NUM_NODES = 3
PLAN = schema.Plan(hidden_size=384, num_labels=2, max_examples=4096, max_tokens=512)


def _cfg(**kw):
    base = dict(max_examples=240, batch_size=4, batches_per_round=2, devices_per_round=2, min_devices=NUM_NODES,
                num_rounds=2, max_length=24, audit_tokens=0, defense="none", eval_examples=6)
    base.update(kw)
    return RunConfig(**base)


# The device's own floor: these in-process devices accept every defence (the baseline `none`
# included) and keep their noise key in memory, as a simulated device does.
PERMISSIVE = {"allowed-defenses": "*", "max-epsilon": float("inf"), "key-store": "memory"}


def _context(cfg, node_id, **node):
    node_config = {"partition-id": node_id - 1, "num-partitions": NUM_NODES, **PERMISSIVE, **node}
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())


class FakeGrid:
    """Routes messages straight to the ClientApp, as Flower's simulation engine would."""

    def __init__(self, cfg):
        self.contexts = {n: _context(cfg, n) for n in range(1, NUM_NODES + 1)}

    def get_node_ids(self):
        return list(self.contexts)

    def deliver(self, messages):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as if pushed to the SuperLink
            replies.append(client_app(m, self.contexts[m.metadata.dst_node_id]))
            replies[-1].metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.deliver(list(messages))


def test_train_reply_carries_exactly_the_schema(minilm_split):
    cfg = _cfg()
    grid = FakeGrid(cfg)
    msg = Message(content=schema.instruction(1, cfg.batches_per_round), message_type=MessageType.TRAIN, dst_node_id=1)
    reply = grid.deliver([msg])[0]
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.keys()) == {schema.RELEASED, schema.METRICS}
    assert set(content.array_records[schema.RELEASED].keys()) == {"hidden", "attention-mask", "labels"}
    rel = schema.parse_release(content, PLAN)
    assert rel.num_examples == cfg.batches_per_round * cfg.batch_size
    # no integer array shaped like token ids, no strings anywhere in the reply
    assert not content.config_records
    assert all(v.dtype != "int64" or len(v.shape) == 1 for v in content.array_records[schema.RELEASED].values())
    # the round decides what is read (a resumed run reads what an uninterrupted one would)
    from privtune_flwr.data import round_indices
    from privtune_flwr.device_runtime import load_node

    node = load_node(cfg, 0, NUM_NODES)
    expected = node.train.select(round_indices(len(node.train), 1, cfg.batches_per_round * cfg.batch_size, cfg.seed * 1000))
    assert rel.labels.tolist() == list(expected["label"])


def test_cloud_never_sees_token_ids_or_text(minilm_split):
    """Search every byte of a reply for the device's text and token ids: neither is there."""
    from privtune_flwr.device_runtime import load_node

    cfg = _cfg(defense="dchi", epsilon=50.0, batches_per_round=1)
    reply = FakeGrid(cfg).deliver([Message(content=schema.instruction(1, 1), message_type=MessageType.TRAIN, dst_node_id=2)])[0]
    payload = b"".join(a.data for a in reply.content.array_records[schema.RELEASED].values())
    payload += repr(dict(reply.content.metric_records[schema.METRICS])).encode()
    assert not reply.content.config_records
    texts = list(load_node(cfg, 1, NUM_NODES).train["text"])  # node 2 holds partition 1
    assert all(t.encode()[:24] not in payload for t in texts)
    leaked = 0
    for text in texts:
        ids = torch.tensor(minilm_split.tokenizer(text)["input_ids"][1:6])
        if len(ids) < 5:
            continue
        for dtype in (torch.int64, torch.int32, torch.int16, torch.float32):
            leaked += ids.to(dtype).numpy().tobytes() in payload
    assert leaked == 0


def test_consecutive_rounds_read_fresh_examples():
    cfg = _cfg()
    grid = FakeGrid(cfg)
    seen = []
    for r in (1, 2):
        reply = grid.deliver([Message(content=schema.instruction(r, 2), message_type=MessageType.TRAIN, dst_node_id=1)])[0]
        seen.append(schema.parse_release(reply.content, PLAN).hidden.sum().item())
    assert seen[0] != seen[1]


def test_dchi_release_and_self_audit():
    cfg = _cfg(defense="dchi", epsilon=1000.0, audit_tokens=64)
    reply = FakeGrid(cfg).deliver([Message(content=schema.instruction(1, 1), message_type=MessageType.TRAIN, dst_node_id=1)])[0]
    rel = schema.parse_release(reply.content, PLAN)
    # little noise at eps=1000 (E||z|| = 0.38 vs ||h|| ~ 11): layer-1 tokens stay decodable
    assert rel.metrics["self-audit-knn"] > 0.5
    strong = _cfg(defense="dchi", epsilon=4.0, audit_tokens=64)  # noise norm d/eps = 96 >> ||h|| ~ 11
    reply = FakeGrid(strong).deliver([Message(content=schema.instruction(1, 1), message_type=MessageType.TRAIN, dst_node_id=1)])[0]
    noisy = schema.parse_release(reply.content, PLAN).metrics["self-audit-knn"]
    assert noisy < rel.metrics["self-audit-knn"] - 0.2


def test_bad_node_config_is_named():
    with pytest.raises(ValueError, match="partition-id=5 / num-partitions=2"):
        partition_ids({"partition-id": 5, "num-partitions": 2})
    with pytest.raises(ValueError, match="needs integer 'partition-id'"):
        partition_ids({})


def test_strategy_trains_evaluates_checkpoints_and_rejects_bad_replies(tmp_path, caplog):
    cfg = _cfg(num_rounds=1)
    split = load_split("minilm", 1, num_labels=2, lora_rank=4)
    cloud = CloudSide(split, learning_rate=1e-3, batch_size=cfg.batch_size)
    strategy = SplitLearningStrategy(cloud, cfg, output_dir=tmp_path)
    grid = FakeGrid(cfg)
    before = split.trainable_state()
    messages = list(strategy.configure_train(1, None, None, grid))
    assert len(messages) == cfg.devices_per_round
    assert all(schema.read_instruction(m.content) == (1, cfg.batches_per_round) for m in messages)
    replies = grid.deliver(messages)
    # a device that failed and a hostile reply with token ids: both rejected, the round goes on
    failed = Message(Error(code=0, reason="out of memory"), reply_to=messages[0])
    hostile_content = schema.release_content(*_hostile(), {"num-examples": 2, "num-tokens": 4})
    hostile_content[schema.RELEASED]["input-ids"] = hostile_content[schema.RELEASED]["labels"]
    hostile = Message(hostile_content, reply_to=messages[0])
    arrays, metrics = strategy.aggregate_train(1, replies + [failed, hostile])
    assert metrics["valid-replies"] == 2 and metrics["steps"] == 2 * cfg.batches_per_round
    assert [r["reason"][:12] for r in strategy.rejected] == ["device error", "release arra"]
    after = split.trainable_state()
    assert set(arrays.keys()) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    strategy.checkpoint(1)
    ckpt = torch.load(tmp_path / "checkpoints" / "round-001.pt", weights_only=True)
    assert set(ckpt) == {"cloud", "torch-rng", "meta"}
    assert set(ckpt["cloud"]) == {"trainable", "optimizer", "steps"} and ckpt["cloud"]["steps"] == 4
    ev = strategy.aggregate_evaluate(1, grid.deliver(list(strategy.configure_evaluate(1, None, None, grid))))
    assert ev["test-num-examples"] == NUM_NODES * cfg.eval_examples
    assert 0.0 <= ev["test-accuracy"] <= 1.0
    assert json.loads((tmp_path / "history.json").read_text())[0]["valid-replies"] == 2


def test_round_without_enough_replies_leaves_top_unchanged(tmp_path):
    cfg = _cfg(num_rounds=1, min_replies=2)
    split = load_split("minilm", 1, num_labels=2, lora_rank=4)
    strategy = SplitLearningStrategy(CloudSide(split, learning_rate=1e-3, batch_size=4), cfg, output_dir=tmp_path)
    grid = FakeGrid(cfg)
    messages = list(strategy.configure_train(1, None, None, grid))
    before = split.trainable_state()
    arrays, metrics = strategy.aggregate_train(1, grid.deliver(messages[:1]))
    assert arrays is None and metrics["valid-replies"] == 1
    assert all(torch.equal(before[k], v) for k, v in split.trainable_state().items())


def _hidden_of(n=2, t=2, d=384):
    return torch.zeros(n, t, d), torch.ones(n, t, dtype=torch.long), torch.tensor([0, 1])


def _hostile():
    return _hidden_of()


class ShuffledGrid(FakeGrid):
    """The same three devices under other node ids, as each run of Flower draws them."""

    def __init__(self, cfg, node_ids):
        self.contexts = {}
        for pid, node in enumerate(node_ids):
            context = _context(cfg, pid + 1)
            context.node_id = node
            self.contexts[node] = context


def test_sampling_and_training_order_follow_partitions_not_node_ids(minilm_split):
    cfg = _cfg(num_rounds=3, devices_per_round=2, min_devices=NUM_NODES)
    picked = []
    for node_ids in ([901, 17, 555], [3, 70000, 12], [42, 41, 40]):
        grid = ShuffledGrid(cfg, node_ids)
        strategy = SplitLearningStrategy(CloudSide(minilm_split, learning_rate=1e-3, batch_size=4), cfg)
        rounds = []
        for r in (1, 2, 3):
            messages = list(strategy.configure_train(r, None, None, grid))
            rounds.append([strategy.partition[m.metadata.dst_node_id] for m in messages])
        picked.append(rounds)
        assert strategy.device_name(node_ids[2]) == "device 2"
    assert picked[0] == picked[1] == picked[2]
    assert all(r == sorted(r) for r in picked[0])  # in partition order
    assert len({tuple(r) for r in picked[0]}) > 1  # and not always the same devices
