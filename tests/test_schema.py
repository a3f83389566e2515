"""The message schema: releases carry exactly hidden/mask/labels; anything else is rejected."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privtune_flwr import schema

PLAN = schema.Plan(hidden_size=8, num_labels=2, max_examples=4, max_tokens=6)


def _release(n=3, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 3:] = 0
    hidden = torch.randn(n, t, d, generator=g) * mask.unsqueeze(-1)
    labels = torch.tensor([0, 1, 1][:n])
    return hidden, mask, labels


def _content(**overrides):
    hidden, mask, labels = _release()
    content = schema.release_content(hidden, mask, labels, {"num-examples": 3, "num-tokens": float(mask.sum())})
    arrays = content.array_records[schema.RELEASED]
    for key, value in overrides.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = Array(value)
    return content


def test_roundtrip_keeps_values():
    hidden, mask, labels = _release()
    rel = schema.parse_release(_content(), PLAN)
    assert torch.equal(rel.hidden, hidden) and torch.equal(rel.attention_mask, mask) and torch.equal(rel.labels, labels)
    assert set(_content().array_records[schema.RELEASED].keys()) == {"hidden", "attention-mask", "labels"}


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"labels": None}, "differ from the schema"),
        ({"input-ids": np.zeros((3, 5), dtype=np.int64)}, "differ from the schema"),  # token ids must never travel
        ({"hidden": np.zeros((3, 5, 7), dtype=np.float32)}, "expected [N, T, 8]"),
        ({"hidden": np.zeros((3, 5, 8), dtype=np.float64)}, "dtype float64"),
        ({"hidden": np.full((3, 5, 8), np.nan, dtype=np.float32)}, "non-finite"),
        ({"labels": np.array([0, 1, 5], dtype=np.int64)}, "labels span 0..5"),
        ({"attention-mask": np.full((3, 5), 2, dtype=np.int8)}, "0/1"),
        ({"attention-mask": np.ones((2, 5), dtype=np.int8)}, "does not match"),
    ],
)
def test_malformed_replies_are_rejected(overrides, needle):
    with pytest.raises(schema.SchemaError) as err:
        schema.parse_release(_content(**overrides), PLAN)
    assert needle in str(err.value)


def test_values_at_padding_are_rejected():
    hidden, mask, labels = _release()
    hidden[0, 4] = 1.0  # padding position carrying data
    content = schema.release_content(hidden, mask, labels, {"num-examples": 3, "num-tokens": 13})
    with pytest.raises(schema.SchemaError, match="padding"):
        schema.parse_release(content, PLAN)


def test_extra_records_and_metrics_are_rejected():
    content = _content()
    content["text"] = ConfigRecord({"text": "leaked sentence"})
    with pytest.raises(schema.SchemaError, match="reply records"):
        schema.parse_release(content, PLAN)
    with pytest.raises(schema.SchemaError, match="not part of the schema"):
        schema.release_content(*_release(), {"num-examples": 3, "num-tokens": 1, "token-0": 101})
    bad = _content()
    bad[schema.METRICS] = MetricRecord({"num-examples": 2.0, "num-tokens": 1.0})
    with pytest.raises(schema.SchemaError, match="num-examples=2"):
        schema.parse_release(bad, PLAN)


def test_instruction_roundtrip_and_errors():
    assert schema.read_instruction(schema.instruction(4, 8)) == (4, 8)
    with pytest.raises(schema.SchemaError):
        schema.read_instruction(RecordDict({}))
    with pytest.raises(schema.SchemaError, match="num-batches=-1"):
        schema.read_instruction(RecordDict({"config": ConfigRecord({"server-round": 1, "num-batches": -1})}))
    for bad in ({"server-round": 1.5, "num-batches": 1}, {"server-round": 1, "num-batches": "8"},
                {"server-round": 0, "num-batches": 1}, {"server-round": 1, "num-batches": 10**9}):
        with pytest.raises(schema.SchemaError):
            schema.read_instruction(RecordDict({"config": ConfigRecord(bad)}))
    assert isinstance(ArrayRecord(), ArrayRecord)


def _raw(dtype, shape, stype, data):
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _npy(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,array,needle",
    [
        # pickled object payload: rejected from its header, never unpickled
        ("hidden", _raw("float32", (3, 5, 8), "numpy.ndarray", _npy(np.array([{"x": 1}] * 3, dtype=object))), "payload"),
        ("hidden", _raw("float32", (3, 5, 8), "torch.Tensor", _npy(np.zeros((3, 5, 8), np.float32))), "serialisation type"),
        # float64 payload under float32 metadata: passed validation before, crashed the round after
        ("hidden", _raw("float32", (3, 5, 8), "numpy.ndarray", _npy(np.zeros((3, 5, 8), np.float64))), "payload"),
        ("hidden", _raw("float32", (3, 5, 8), "numpy.ndarray", _npy(np.zeros((3, 5, 8), np.float32))[:-4]), "payload bytes"),
        ("hidden", _raw("float32", (3, 5, 8), "numpy.ndarray", b"garbage" * 10), "not a plain npy"),
        ("hidden", _raw("no-such-dtype", (3, 5, 8), "numpy.ndarray", b""), "not a dtype"),
        ("hidden", _raw(">f4", (3, 5, 8), "numpy.ndarray", _npy(np.zeros((3, 5, 8), ">f4"))), "dtype"),
        ("labels", _raw("int64", (3,), "numpy.ndarray", _npy(np.asfortranarray(np.zeros((3,), np.int64)))[:-1]), "payload"),
    ],
)
def test_hostile_payloads_are_rejected_without_being_parsed(name, array, needle):
    content = _content()
    content.array_records[schema.RELEASED][name] = array
    with pytest.raises(schema.SchemaError, match=needle):
        schema.parse_release(content, PLAN)


def test_replies_beyond_the_plan_are_rejected_before_they_are_read():
    big = schema.release_content(torch.zeros(2, 4096, 8), torch.ones(2, 4096, dtype=torch.long), torch.tensor([0, 1]),
                                 {"num-examples": 2, "num-tokens": 8192})
    with pytest.raises(schema.SchemaError, match="plan allows at most"):
        schema.parse_release(big, PLAN)
    many = schema.release_content(torch.zeros(5, 2, 8), torch.ones(5, 2, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                                  {"num-examples": 5, "num-tokens": 10})
    with pytest.raises(schema.SchemaError, match="5 sequences of 2 tokens"):
        schema.parse_release(many, PLAN)


@pytest.mark.parametrize(
    "metrics,needle",
    [
        ({"num-examples": float("nan"), "num-tokens": 13}, "not a finite number"),
        ({"num-examples": float("inf"), "num-tokens": 13}, "not a finite number"),
        ({"num-examples": 3, "num-tokens": 12}, "num-tokens=12"),
        ({"num-examples": 3, "num-tokens": 13, "self-audit-knn": -5.0}, "self-audit-knn=-5.0"),
        ({"num-examples": 3, "num-tokens": 13, "epsilon-token-max": float("nan")}, "epsilon-token-max"),
        ({"num-examples": 3, "num-tokens": 13, "releases-per-example-max": 1.5}, "an integer"),
        ({"num-examples": 3, "num-tokens": 13, "bottom-seconds": [1.0, 2.0]}, "not a finite number"),
    ],
)
def test_every_metric_is_checked_for_type_and_range(metrics, needle):
    content = _content()
    content[schema.METRICS] = MetricRecord(metrics)
    with pytest.raises(schema.SchemaError, match=needle):
        schema.parse_release(content, PLAN)


def test_u_shaped_replies_carry_no_labels():
    hidden, mask, _ = _release()
    content = schema.release_content(hidden, mask, None, {"num-examples": 3, "num-tokens": float(mask.sum())})
    plan = schema.Plan(hidden_size=8, num_labels=0, max_examples=4, max_tokens=6)
    assert schema.parse_release(content, plan).labels is None
    with pytest.raises(schema.SchemaError, match="differ from the schema"):
        schema.parse_release(_content(), plan)  # labels in a u-shaped reply: rejected
