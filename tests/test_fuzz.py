"""Property-based fuzzing of everything that reads a message from the other side.

Each test generates at least 1000 malformed (and some well-formed) messages: no exception other
than the schema's own escapes, no state is corrupted, and memory stays bounded.
"""

from __future__ import annotations

import gc
import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privtune_flwr import schema

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
PLAN = schema.Plan(hidden_size=8, num_labels=2, max_examples=4, max_tokens=6)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


DTYPES = ["float32", "float64", "int8", "int64", "int32", "uint8", "bool", "<f4", ">f4", "float16", "object", "xx", ""]
NUMBERS = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 3, 4, -1, 0.5, 1e30, math.nan, math.inf]),
)


@st.composite
def arrays(draw) -> Array:
    """A well-formed array, a mismatched one, or garbage."""
    kind = draw(st.sampled_from(["npy", "mismatch", "bytes", "pickle"]))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=4)))
    dtype = draw(st.sampled_from(["float32", "int8", "int64", "float64"]))
    if kind == "pickle":
        data = _npy(np.array([{"x": 1}, None], dtype=object))
    elif kind == "bytes":
        data = draw(st.binary(max_size=300))
    else:
        values = np.asarray(draw(st.lists(NUMBERS, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                            dtype=np.float64)
        with np.errstate(all="ignore"):
            data = _npy(values.reshape(shape).astype(dtype))
    meta_dtype = dtype if kind == "npy" else draw(st.sampled_from(DTYPES))
    meta_shape = shape if kind == "npy" else tuple(draw(st.lists(st.integers(-2, 9), max_size=4)))
    stype = draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch", ""]))
    return Array(dtype=meta_dtype, shape=meta_shape, stype=stype, data=data)


def _valid(draw) -> RecordDict:
    n, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    mask = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        mask[i, : draw(st.integers(1, t))] = 1
    hidden = torch.randn(n, t, 8, generator=torch.Generator().manual_seed(draw(st.integers(0, 9)))) * mask.unsqueeze(-1)
    labels = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    return schema.release_content(hidden, mask, labels, {"num-examples": n, "num-tokens": float(mask.sum())})


@st.composite
def replies(draw) -> RecordDict:
    """A valid release with 0-3 hostile mutations, or a reply of random records."""
    if draw(st.booleans()):
        content = _valid(draw)
        for _ in range(draw(st.integers(0, 3))):
            mutation = draw(st.sampled_from(["array", "drop", "add", "metric", "metric-drop", "record", "config"]))
            released = content.array_records[schema.RELEASED]
            if mutation == "array":
                released[draw(st.sampled_from([schema.HIDDEN, schema.MASK, schema.LABELS, "input-ids"]))] = draw(arrays())
            elif mutation == "drop" and len(released):
                del released[draw(st.sampled_from(sorted(released.keys())))]
            elif mutation == "add":
                released[draw(st.text(max_size=8))] = draw(arrays())
            elif mutation == "metric" and schema.METRICS in content.metric_records:
                key = draw(st.sampled_from(list(schema.METRIC_RANGES) + ["token-7", ""]))
                content.metric_records[schema.METRICS][key] = draw(st.one_of(NUMBERS, st.lists(st.integers(-(2**62), 2**62), max_size=3)))
            elif mutation == "metric-drop":
                content[schema.METRICS] = MetricRecord({})
            elif mutation == "record":
                content[draw(st.text(max_size=6))] = MetricRecord({"x": 1.0})
            elif mutation == "config":
                content[schema.METRICS] = ConfigRecord({"num-examples": "3"})
        return content
    records = {}
    for name in draw(st.lists(st.sampled_from([schema.RELEASED, schema.METRICS, "other"]), max_size=3)):
        records[name] = draw(st.sampled_from([
            ArrayRecord({k: draw(arrays()) for k in draw(st.lists(st.sampled_from([schema.HIDDEN, schema.MASK, schema.LABELS]), max_size=3))}),
            MetricRecord({"num-examples": 1.0}), ConfigRecord({"a": "b"})]))
    return RecordDict(records)


def _check_release(rel: schema.Release) -> None:
    n, t, d = rel.hidden.shape
    assert d == PLAN.hidden_size and 1 <= n <= PLAN.max_examples and 1 <= t <= PLAN.max_tokens
    assert torch.isfinite(rel.hidden).all() and set(rel.attention_mask.unique().tolist()) <= {0, 1}
    assert (rel.hidden[rel.attention_mask == 0] == 0).all()
    assert rel.labels is None or ((rel.labels >= 0) & (rel.labels < PLAN.num_labels)).all()
    assert all(math.isfinite(v) for v in rel.metrics.values())


def test_fuzz_the_reply_parser():
    seen = {"valid": 0, "rejected": 0}
    before = None

    @FUZZ
    @given(replies())
    def run(content):
        nonlocal before
        try:
            _check_release(schema.parse_release(content, PLAN))
            seen["valid"] += 1
        except schema.SchemaError:
            seen["rejected"] += 1
        if before is None:
            gc.collect()
            before = _rss_mb()

    run()
    assert seen["valid"] + seen["rejected"] >= 1000
    assert seen["valid"] > 50 and seen["rejected"] > 500  # both paths exercised
    gc.collect()
    assert _rss_mb() - before < 100


# Dimensions at the integer limits where a fixed-width product wraps (2**32 x 2**32 = 2**64 -> 0
# in int64) or overflows: the parser must size them exactly and refuse them by name.
LIMITS = [2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64]


@st.composite
def huge_shapes(draw) -> tuple[int, ...]:
    """A rank-1..4 shape with at least one dimension near 2**31, 2**32 or 2**63, the others small
    or near a limit too (at least one element: an empty shape is a different, honest size)."""
    dims = draw(st.lists(st.one_of(st.sampled_from(LIMITS), st.integers(1, 9)), min_size=1, max_size=4))
    dims[draw(st.integers(0, len(dims) - 1))] = draw(st.sampled_from(LIMITS))
    return tuple(dims)


def test_fuzz_declared_shapes_near_the_integer_limits():
    """Metadata and npy header both declare a huge shape; the payload is empty or a few bytes. Every
    such array is refused with the size error (never the catch-all), whichever array it poses as."""
    seen = {"refused": 0}

    @FUZZ
    @given(huge_shapes(), st.sampled_from([schema.HIDDEN, schema.MASK, schema.LABELS]), st.binary(max_size=16))
    def run(shape, name, tail):
        dtype = schema.RELEASE_ARRAYS[name]
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": dtype.str, "fortran_order": False, "shape": shape})
        content = _valid_content()
        content.array_records[schema.RELEASED][name] = Array(dtype=str(dtype), shape=shape, stype="numpy.ndarray",
                                                             data=buf.getvalue() + tail)
        ndim = {schema.HIDDEN: 3, schema.MASK: 2, schema.LABELS: 1}[name]
        with pytest.raises(schema.SchemaError) as err:
            schema.parse_release(content, PLAN)
        text = str(err.value)
        assert "unparseable" not in text
        if len(shape) == ndim:  # the right rank: refused for its size, which the message states exactly
            assert f"{name} declares shape {shape} = {math.prod(shape)} elements" in text, text
        else:
            assert f"the schema says rank {ndim}" in text, text
        seen["refused"] += 1

    run()
    assert seen["refused"] >= 1000


def _valid_content() -> RecordDict:
    mask = torch.ones(2, 3, dtype=torch.long)
    return schema.release_content(torch.ones(2, 3, 8), mask, torch.tensor([0, 1]), {"num-examples": 2, "num-tokens": 6})


# ------------------------------------------------------------------------------- the ClientApp


@st.composite
def instructions(draw) -> RecordDict:
    value = st.one_of(NUMBERS, st.text(max_size=5), st.binary(max_size=5), st.booleans(),
                      st.lists(st.integers(-(2**62), 2**62), max_size=3))
    if draw(st.booleans()):
        config = {"server-round": draw(st.one_of(st.integers(-3, 5), value)),
                  "num-batches": draw(st.one_of(st.integers(-2, 3), value))}
        if draw(st.integers(0, 2)) == 0:  # keys beyond the schema: refused (never ignored)
            for key in draw(st.lists(st.text(max_size=6), max_size=2)):
                config[key] = draw(value)
        content = RecordDict({schema.CONFIG: ConfigRecord(config)})
    else:
        content = RecordDict({draw(st.text(max_size=6)): ConfigRecord({"server-round": 1})})
    if draw(st.integers(0, 4)) == 0:
        content["extra"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    return content


def test_fuzz_the_device_instruction_handler():
    from privtune_flwr import client_app as device_app
    from privtune_flwr import device_runtime as runtime
    from privtune_flwr.config import RunConfig
    from privtune_flwr.device_policy import PolicyError

    cfg = RunConfig(max_examples=60, batch_size=2, max_length=16, audit_tokens=0, defense="dchi", epsilon=50.0,
                    eval_examples=2)
    node = {"partition-id": 0, "num-partitions": 2, "key-store": "memory", "max-batches-per-instruction": 2}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_flower())
    seen = {"reply": 0, "rejected": 0}
    warm = Message(content=schema.instruction(1, 1), message_type=MessageType.TRAIN, dst_node_id=1)
    warm.metadata.__dict__["_message_id"] = warm.object_id
    device_app.app(warm, context)  # the model and data are loaded once, before memory is measured
    gc.collect()
    before = _rss_mb()

    @FUZZ
    @given(instructions(), st.sampled_from([MessageType.TRAIN, MessageType.EVALUATE]))
    def run(content, kind):
        state = dict(context.state.config_records.get(runtime.STATE, ConfigRecord({})))
        msg = Message(content=content, message_type=kind, dst_node_id=1)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        try:
            reply = device_app.app(msg, context)
            assert not reply.has_error()
            schema.parse_release(reply.content, schema.Plan(384, 2, 4, 16))
            # only an instruction that carries exactly the schema is answered
            assert set(content.keys()) == {schema.CONFIG}
            assert set(content.config_records[schema.CONFIG].keys()) <= set(schema.INSTRUCTION_KEYS)
            seen["reply"] += 1
        except (schema.SchemaError, PolicyError):
            seen["rejected"] += 1
            # a rejected instruction changes nothing on the device
            assert dict(context.state.config_records.get(runtime.STATE, ConfigRecord({}))) == state

    run()
    assert seen["reply"] + seen["rejected"] >= 1000 and seen["reply"] > 20 and seen["rejected"] > 500
    gc.collect()
    assert _rss_mb() - before < 100


# ------------------------------------------------------------------------------- the strategy


@pytest.fixture(scope="module")
def strategy_parts():
    from transformers import AutoTokenizer

    from privtune_flwr.cloud import CloudSide
    from privtune_flwr.config import RunConfig
    from privtune_flwr.models import load_split, resolve_model
    from tests.conftest import tiny_hf_model

    split = load_split("tiny-bert", 1, hf_model=tiny_hf_model("encoder", layers=2), lora_rank=2,
                       tokenizer=AutoTokenizer.from_pretrained(resolve_model("minilm")))
    cfg = RunConfig(batch_size=2, batches_per_round=2, max_length=8, eval_examples=4, min_replies=1,
                    devices_per_round=1, min_devices=1)
    return split, cfg, CloudSide


def test_fuzz_the_strategy_aggregation(strategy_parts, tmp_path):
    from strategies import SplitLearningStrategy

    split, cfg, CloudSide = strategy_parts
    strategy = SplitLearningStrategy(CloudSide(split, learning_rate=1e-3, batch_size=cfg.batch_size), cfg)
    strategy.plan = lambda phase: schema.Plan(hidden_size=split.hidden_size, num_labels=2, max_examples=4, max_tokens=6)
    instruction = Message(content=schema.instruction(1, 2), message_type=MessageType.TRAIN, dst_node_id=7)
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    seen = {"trained": 0, "skipped": 0}
    before = None

    def as_reply(content):
        if content is None:
            reply = Message(Error(code=1, reason="device crashed"), reply_to=instruction)
        else:
            reply = Message(content, reply_to=instruction)
        reply.metadata.__dict__["_src_node_id"] = 7
        return reply

    @FUZZ
    @given(st.lists(st.one_of(replies().map(lambda c: _widen(c, split.hidden_size)), st.none()), min_size=1, max_size=3),
           st.booleans())
    def run(contents, evaluate):
        nonlocal before
        weights = {k: v.clone() for k, v in split.trainable_state().items()}
        steps = strategy.cloud.steps
        if evaluate:
            strategy._round = {"round": 1}
            strategy.aggregate_evaluate(1, [as_reply(c) for c in contents])
        else:
            arrays, _ = strategy.aggregate_train(1, [as_reply(c) for c in contents])
            if arrays is None:  # nothing trained: nothing changed
                assert strategy.cloud.steps == steps
                assert all(torch.equal(weights[k], v) for k, v in split.trainable_state().items())
                seen["skipped"] += 1
            else:
                seen["trained"] += 1
        assert all(torch.isfinite(v).all() for v in split.trainable_state().values())
        if before is None:
            gc.collect()
            before = _rss_mb()

    run()
    assert seen["trained"] > 20 and seen["skipped"] > 200
    gc.collect()
    assert _rss_mb() - before < 150


def _widen(content: RecordDict, d: int) -> RecordDict:
    """Fuzzed releases are built with d = 8; give the valid ones the tiny model's width."""
    released = content.array_records.get(schema.RELEASED)
    if released is None or schema.HIDDEN not in released:
        return content
    try:
        hidden = released[schema.HIDDEN].numpy()
    except Exception:  # noqa: BLE001 - garbage stays garbage
        return content
    if hidden.ndim == 3 and hidden.shape[2] == 8 and hidden.dtype == np.float32:
        released[schema.HIDDEN] = Array(np.repeat(hidden, d // 8, axis=2))
    return content
