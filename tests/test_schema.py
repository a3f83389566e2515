"""The message schema: releases carry exactly hidden/mask/labels; anything else is rejected."""

import math

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


def _header_only(shape, descr="<f4") -> bytes:
    """An npy header declaring ``shape``, followed by no payload at all."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(2**32, 2**32, 8), (2**31, 2**31, 8), (2**63, 1, 8), (1, 2**64, 8), (2**21, 2**21, 2**21)])
def test_declared_shapes_that_overflow_int64_are_refused_by_size(shape):
    """np.prod(..., dtype=int64) wraps 2**32 x 2**32 to 0, so an empty payload passed the exact-byte
    check and the reply fell to the catch-all; the size is now Python-integer arithmetic."""
    if shape == (2**32, 2**32, 8):
        assert int(np.prod(shape, dtype=np.int64)) == 0  # what the old check computed: 0 bytes expected
    content = _content()
    content.array_records[schema.RELEASED]["hidden"] = _raw("float32", shape, "numpy.ndarray", _header_only(shape))
    with pytest.raises(schema.SchemaError) as err:
        schema.parse_release(content, PLAN)
    text = str(err.value)
    assert text.startswith(f"hidden declares shape {shape} = {math.prod(shape)} elements") and "unparseable" not in text
    assert f"({math.prod(shape) * 4} bytes)" in text and "accepted: at most" in text
    if math.prod(shape) * 4 > 2**63 - 1:
        assert "more than any array can hold" in text


def test_declared_bytes_is_exact_and_names_the_limit():
    f4 = np.dtype("float32")
    assert schema.declared_bytes((3, 5, 8), f4, name="hidden", max_bytes=480) == 480
    with pytest.raises(schema.SchemaError, match=r"hidden declares shape \(3, 5, 8\) = 120 elements of float32 \(480 bytes\), "
                                                 r"more than the 479 allowed; accepted: at most 479 bytes"):
        schema.declared_bytes((3, 5, 8), f4, name="hidden", max_bytes=479)
    assert schema.declared_bytes((0, 2**40, 8), f4, name="hidden", max_bytes=10) == 0  # an empty declared array is 0 bytes


def _outputs_instruction(values: torch.Tensor):
    return schema.step_instruction(2, 1, values)


@pytest.mark.parametrize("value,needle", [(1e38, r"outputs hold values up to 1e\+38; accepted: finite values with \|value\| <= 1e\+06"),
                                          (3.4e38, r"up to 3.4e\+38"),
                                          (float("nan"), r"outputs hold non-finite values: 1 of 24 \(first: nan\); accepted: finite"),
                                          (float("-inf"), r"non-finite values: 1 of 24 \(first: -inf\)")])
def test_a_device_refuses_outputs_outside_its_range(value, needle):
    outputs = torch.zeros(1, 3, 8)
    outputs[0, 1, 2] = value
    with pytest.raises(schema.SchemaError, match=needle):
        schema.read_step(_outputs_instruction(outputs), shape=(1, 3, 8), max_abs=1e6)
    fine = torch.full((1, 3, 8), -1e6)
    assert torch.equal(schema.read_step(_outputs_instruction(fine), shape=(1, 3, 8), max_abs=1e6)[2], fine)
    if math.isfinite(value):  # without a range only finiteness is checked (the cloud's own reads)
        assert schema.read_step(_outputs_instruction(outputs), shape=(1, 3, 8))[2][0, 1, 2] == np.float32(value)
