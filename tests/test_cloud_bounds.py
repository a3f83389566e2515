"""The cloud's own bounds against a hostile device: every evaluation reply is scored in chunks and
within a per-reply budget taken from the run's plan, not from what the schema can hold."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message, MessageType

from privtune_flwr import data, schema
from privtune_flwr.cloud import EVAL_CHUNK, CloudSide
from privtune_flwr.config import RunConfig
from privtune_flwr.models import load_split
from strategies import SplitLearningStrategy
from tests.conftest import LinkGrid, tiny_hf_model


@pytest.fixture(scope="module")
def tiny_split(minilm_tokenizer):
    torch.manual_seed(0)
    return load_split("tiny-bert", 1, hf_model=tiny_hf_model("encoder", layers=2), lora_rank=2, tokenizer=minilm_tokenizer)


def _strategy(split, **kw):
    cfg = RunConfig(**{"batch_size": 4, "batches_per_round": 2, "max_length": 16, "min_replies": 1, "devices_per_round": 1,
                       "min_devices": 1, **kw})
    return SplitLearningStrategy(CloudSide(split, learning_rate=1e-3, batch_size=cfg.batch_size), cfg)


def _reply(node: int, n: int, t: int, d: int, *, real: int | None = None, seed: int = 0) -> Message:
    """An evaluation reply of ``n`` sequences of ``t`` positions (``real`` of them real tokens)."""
    g = torch.Generator().manual_seed(seed + node)
    mask = torch.zeros(n, t, dtype=torch.long)
    mask[:, : t if real is None else real] = 1
    hidden = torch.randn(n, t, d, generator=g) * mask.unsqueeze(-1)
    labels = torch.randint(0, 2, (n,), generator=g)
    content = schema.release_content(hidden, mask, labels, {"num-examples": n, "num-tokens": float(mask.sum())})
    instruction = Message(content=schema.instruction(1, 0), message_type=MessageType.EVALUATE, dst_node_id=node)
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_an_evaluation_reply_beyond_eval_examples_is_rejected_and_counted(tiny_split):
    strategy = _strategy(tiny_split, eval_examples=6)
    assert strategy.plan("evaluate").max_examples == 6 and strategy.plan("train").max_examples == 8
    d = tiny_split.hidden_size
    weights = {k: v.clone() for k, v in tiny_split.trainable_state().items()}
    strategy._round = {"round": 1}
    metrics = strategy.aggregate_evaluate(1, [_reply(1, 6, 16, d), _reply(2, 7, 16, d), _reply(3, 6, 17, d), _reply(4, 3, 5, d)])
    assert metrics["test-num-examples"] == 6 + 3  # the two honest replies, scored
    causes = {e["device"]: e["cause"] for e in strategy.rejected.entries}
    assert set(causes) == {"node 2 (partition unknown)", "node 3 (partition unknown)"}
    assert "7 sequences of 16 tokens; this round's plan allows at most 6 of 16" in causes["node 2 (partition unknown)"]
    assert "6 sequences of 17 tokens" in causes["node 3 (partition unknown)"]
    assert all(torch.equal(weights[k], v) for k, v in tiny_split.trainable_state().items())


def test_the_whole_test_share_is_budgeted_at_the_largest_honest_share(tiny_split):
    """eval-examples = 0: the budget is ceil(test rows / partitions), which every device's iid share
    of the test split meets (one of them exactly), instead of reply-max-examples (2048)."""
    strategy = _strategy(tiny_split, dataset="rotten_tomatoes", max_examples=403, eval_examples=0)
    strategy.partition = {10 + p: p for p in range(4)}  # four devices have said which partition they hold
    budget = strategy.evaluation_examples()
    test = data.load_dataset("rotten_tomatoes", test_fraction=0.1, seed=0, max_examples=403).test
    shares = [len(data.partition(test, 4, p, partitioner="iid", seed=0)) for p in range(4)]
    assert budget == math.ceil(len(test) / 4) == max(shares) == 101 and strategy.plan("evaluate").max_examples == 101
    # the whole corpus: 853 test rows over 8 devices (the honest 107 sentences)
    whole = _strategy(tiny_split, dataset="rotten_tomatoes", eval_examples=0)
    whole.partition = {n: n for n in range(8)}
    assert whole.evaluation_examples() == 107
    # a dataset only the devices hold: max-examples bounds it, else reply-max-examples (said in the log)
    assert _strategy(tiny_split, dataset="/nowhere/mine.csv", max_examples=40, eval_examples=0).evaluation_examples() == 40
    assert _strategy(tiny_split, dataset="/nowhere/mine.csv", eval_examples=0, reply_max_examples=300).evaluation_examples() == 300
    # reply-max-examples caps every budget
    assert _strategy(tiny_split, eval_examples=500, reply_max_examples=300).evaluation_examples() == 300


def test_evaluation_scores_every_reply_in_chunks_and_equals_one_piece_scoring(tiny_split):
    """No forward of the top sees more than EVAL_CHUNK sequences, and the metrics are those of
    scoring each reply in one piece."""
    strategy = _strategy(tiny_split, eval_examples=150)
    d = tiny_split.hidden_size
    replies = [_reply(1, 150, 16, d, real=9), _reply(2, 70, 12, d), _reply(3, 1, 3, d)]
    top = tiny_split.top
    seen: list[tuple[int, int]] = []
    hook = top.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    try:
        strategy._round = {"round": 1}
        metrics = strategy.aggregate_evaluate(1, replies)
    finally:
        hook.remove()
    assert max(n for n, _ in seen) == EVAL_CHUNK and sum(n for n, _ in seen) == 221
    assert seen[:3] == [(64, 9), (64, 9), (22, 9)]  # all-pad columns of a right-padded encoder dropped
    parsed = [schema.parse_release(r.content, strategy.plan("evaluate")) for r in replies]
    top.eval()
    with torch.no_grad():
        logits = torch.cat([top(p.hidden, p.attention_mask) for p in parsed])
    from privtune_flwr.tasks import classification_metrics

    want = classification_metrics(logits, torch.cat([p.labels for p in parsed]), 2)
    assert metrics["test-num-examples"] == 221
    for key in ("accuracy", "macro-f1"):
        assert metrics[f"test-{key}"] == want[key]
    assert metrics["test-loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert not strategy.rejected.entries


class _LinkGrid(LinkGrid):
    """Replies are built when pulled (the link holds them, not the cloud); ``make(node, kind)``
    gives a device's reply. Records the ids asked for in each pull."""

    def __init__(self, make):
        super().__init__()
        self.make, self.pulls = make, []

    def pull_messages(self, ids):
        ids = list(ids)
        self.pulls.append(len(ids))
        out = []
        for i in ids:
            asked = self.sent.pop(i)
            content = self.make(asked.metadata.dst_node_id, asked.metadata.message_type)
            reply = Message(content, reply_to=asked)
            reply.metadata.__dict__["_src_node_id"] = asked.metadata.dst_node_id
            out.append(reply)
        return out


def _content(n, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    return schema.release_content(torch.randn(n, t, d, generator=g), mask, torch.randint(0, 2, (n,), generator=g),
                                  {"num-examples": n, "num-tokens": float(n * t)})


def test_an_oversized_reply_is_dropped_as_it_arrives_one_at_a_time_and_never_held(tiny_split):
    """The cloud pulls one reply at a time and drops one beyond the phase's byte budget before the
    next pull: two 24 MB hostile replies (one in its arrays, one in a config record the schema
    would reject anyway) never sit in the cloud's memory together, and are booked as rejections
    of the devices they came from; a reply at exactly the plan's budget is scored."""
    import tracemalloc

    from flwr.app import ConfigRecord

    from strategies.reporting import OVERSIZED, ProgressGrid
    from strategies.split_learning import reply_bytes

    strategy = _strategy(tiny_split, eval_examples=6)
    d, plan = tiny_split.hidden_size, strategy.plan("evaluate")
    budget = reply_bytes(plan)
    big = 24 << 20

    def make(node, kind):
        if kind == MessageType.QUERY:  # which partition the device holds
            return schema.device_identity(node - 1, 3)
        if node == 1:  # honest, at the plan's limit
            return _content(plan.max_examples, plan.max_tokens, d)
        if node == 2:  # the arrays of a reply far beyond the plan
            return _content(big // (16 * d * 4), 16, d, seed=2)
        content = _content(2, 4, d, seed=3)  # a small release with a 24 MB config value beside it
        content["padding"] = ConfigRecord({"x": b"\0" * big})
        return content

    assert schema.content_bytes(make(1, MessageType.EVALUATE)) <= budget < big
    link = _LinkGrid(make)
    grid = ProgressGrid(link)
    link.get_node_ids = lambda: [1, 2, 3]
    strategy._round = {"round": 1}
    strategy._t_round = 0.0
    tracemalloc.start()
    try:
        strategy.evaluate_round(grid, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert link.pulls and max(link.pulls) == 1  # one reply per pull
    # one oversized reply at a time (with its own construction copy), never both
    assert peak < 2 * big + budget + (16 << 20), peak
    causes = {e["device"]: e["cause"] for e in strategy.rejected.entries}
    assert set(causes) == {"device 1", "device 2"}, causes  # partitions 1 and 2: the hostile nodes 2 and 3
    for cause in causes.values():
        assert OVERSIZED in cause and f"at most {budget} bytes per reply" in cause
    assert strategy.history[-1]["test-num-examples"] == plan.max_examples
