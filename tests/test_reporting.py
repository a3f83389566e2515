"""What the cloud tells its user: short causes, per-round rejection lines, incomplete rounds,
progress while devices work, and a missing reply turned into an error."""

import logging

import pytest
from flwr.app import Message, MessageType, RecordDict

from privtune_flwr import schema
from strategies.reporting import (NO_REPLY, NOT_REACHED, ProgressGrid, RejectedReplies, incomplete_rounds,
                                  last_evaluation, short_cause)

RAY_TRACEBACK = """device error: ClientApp raised an exception
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/flwr/clientapp/client_app.py", line 150, in __call__
    return self._registered_funcs[...](message, context)
  File "/work/privtune_flwr/client_app.py", line 78, in load_node
    train = data.partition(ds.train, total, pid)
ValueError: num_partitions=3 must be between 1 and len(dataset)=2
""" + "ray internals " * 150


def test_short_cause_keeps_the_exception_line_only():
    assert short_cause(RAY_TRACEBACK) == "device error: ValueError: num_partitions=3 must be between 1 and len(dataset)=2"
    assert short_cause("release arrays ['input-ids'] differ from the schema's") == "release arrays ['input-ids'] differ from the schema's"
    assert short_cause("ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task.") == (
        "RayActorError: The actor died unexpectedly before finishing this task.")
    oom = "Task was killed due to the node running low on memory.\nMemory on the node was 23.1GB / 24GB " + "x" * 2000
    assert short_cause(oom) == "the device's worker was killed for lack of memory (Ray OutOfMemoryError)"
    chained = ("device error: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
               "  File \"data.py\", line 238, in partition\n    raise ValueError(\n"
               "ValueError: num_partitions must be in [1, 2], got 3\n\n"
               "The above exception was the direct cause of the following exception:\n\n"
               "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: num_partitions")
    assert short_cause(chained) == "device error: ValueError: num_partitions must be in [1, 2], got 3"  # the root cause
    assert short_cause("") == "(no reason given)"
    assert len(short_cause("no exception here " * 50)) == 160


def test_rejections_one_line_per_cause_and_devices_counted(tmp_path, caplog):
    rejected = RejectedReplies(tmp_path)
    for device in ("device 2", "device 0"):  # in the order the replies arrived
        rejected.add(3, "train", device, RAY_TRACEBACK)
    rejected.add(3, "train", "device 4", "device error: RayActorError: The actor died")
    rejected.add(4, "train", "device 2", RAY_TRACEBACK)
    with caplog.at_level(logging.INFO, logger="privtune_flwr.cloud"):
        rejected.report_phase(3, "train")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("round 3 train: 2 replies rejected (device 0, device 2): device error: ValueError: num_partitions=3")
    assert lines[1].startswith("round 3 train: 1 reply rejected (device 4): device error: RayActorError: The actor died")
    assert all(str(tmp_path / "errors.log") in line and len(line) < 300 for line in lines)
    assert rejected.summary() == [
        "device 0: 1x device error: ValueError: num_partitions=3 must be between 1 and len(dataset)=2 (round 3)",
        "device 2: 2x device error: ValueError: num_partitions=3 must be between 1 and len(dataset)=2 (rounds 3, 4)",
        "device 4: 1x device error: RayActorError: The actor died (round 3)",
    ]
    full = (tmp_path / "errors.log").read_text()
    assert full.count("=== round") == 4 and full.count("ray internals") == 3 * 150
    assert "reason" not in rejected.as_records()[0] and len(rejected) == 4
    # a retry of round 3 reports only its own rejections; round 4's entry is still to be reported
    caplog.clear()
    rejected.add(3, "train", "device 0", RAY_TRACEBACK)
    with caplog.at_level(logging.INFO, logger="privtune_flwr.cloud"):
        rejected.report_phase(3, "train")
        rejected.report_phase(4, "train")
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in lines] == [
        "round 3 train: 1 reply rejected (device 0)", "round 4 train: 1 reply rejected (device 2)"]


def test_incomplete_rounds_and_the_last_completed_evaluation():
    rejected = RejectedReplies()
    rejected.add(3, "train", "device 1", "ray.exceptions.OutOfMemoryError: low memory")
    history = [
        {"round": 1, "train-loss": 0.7, "test-accuracy": 0.6},
        {"round": 2, "train-loss": 0.6, "test-accuracy": 0.65},
        {"round": 3, "valid-replies": 0, "test-accuracy": 0.65},  # evaluated an untrained round
    ]
    failed = incomplete_rounds(history, rejected, num_rounds=5)
    assert [(f["round"], f["did-not"]) for f in failed] == [(3, ["train"]), (4, ["train", "evaluate"]), (5, ["train", "evaluate"])]
    assert failed[0]["causes"] == ["train: the device's worker was killed for lack of memory (Ray OutOfMemoryError)"]
    assert failed[1]["causes"] == [NOT_REACHED]
    assert last_evaluation(history)["round"] == 3
    assert last_evaluation([{"round": 1, "train-loss": 0.5}]) == {}
    assert incomplete_rounds(history[:2], rejected, num_rounds=2) == []


class SlowGrid:
    """Replies from some nodes arrive after a few pulls; others never do."""

    def __init__(self, answer_after: dict[int, int]):
        self.answer_after = answer_after
        self.pulls = 0
        self.sent = {}
        self.pull_interval = 0.01

    def get_node_ids(self):
        return list(self.answer_after)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{i}")
            self.sent[f"m{i}"] = m
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in message_ids:
            msg = self.sent[mid]
            wait = self.answer_after[msg.metadata.dst_node_id]
            if wait is not None and self.pulls >= wait:
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
        return out


def test_progress_grid_reports_and_turns_silence_into_errors(caplog):
    grid = SlowGrid({1: 1, 2: 3, 3: None})
    progress = ProgressGrid(grid, first_report=0.0, every=0.0)
    messages = [Message(content=schema.instruction(2, 4), message_type=MessageType.TRAIN, dst_node_id=n) for n in (1, 2, 3)]
    with caplog.at_level(logging.INFO, logger="privtune_flwr.cloud"):
        replies = progress.send_and_receive(messages, timeout=0.3)
    assert progress.get_node_ids() == [1, 2, 3]  # everything else is the wrapped grid's
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == [1, 2]
    missing = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in missing] == [3] and missing[0].error.reason.startswith(NO_REPLY)
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "round 2 train: 1 of 3 devices replied (0 s)"
    assert "round 2 train: 2 of 3 devices replied (0 s)" in said


@pytest.mark.parametrize("pid,total,ok", [(0, 1, True), (4, 5, True), (5, 5, False), (-1, 3, False)])
def test_device_identity_round_trips(pid, total, ok):
    content = schema.device_identity(pid, total) if ok else RecordDict(
        {schema.DEVICE: schema.device_identity(0, 1)[schema.DEVICE].__class__({"partition-id": pid, "num-partitions": total})})
    if ok:
        assert schema.read_device_identity(content) == pid
    else:
        with pytest.raises(schema.SchemaError, match=f"partition-id={pid} is outside"):
            schema.read_device_identity(content)
    with pytest.raises(schema.SchemaError, match="identity reply records"):
        schema.read_device_identity(RecordDict())
