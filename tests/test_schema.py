"""The message schema: releases carry exactly hidden/mask/labels; anything else is rejected."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privtune_flwr import schema


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
    rel = schema.parse_release(_content(), hidden_size=8, num_labels=2)
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
        ({"attention-mask": np.ones((2, 5), dtype=np.int8)}, "do not match"),
    ],
)
def test_malformed_replies_are_rejected(overrides, needle):
    with pytest.raises(schema.SchemaError) as err:
        schema.parse_release(_content(**overrides), hidden_size=8, num_labels=2)
    assert needle in str(err.value)


def test_values_at_padding_are_rejected():
    hidden, mask, labels = _release()
    hidden[0, 4] = 1.0  # padding position carrying data
    content = schema.release_content(hidden, mask, labels, {"num-examples": 3, "num-tokens": 13})
    with pytest.raises(schema.SchemaError, match="padding"):
        schema.parse_release(content, hidden_size=8, num_labels=2)


def test_extra_records_and_metrics_are_rejected():
    content = _content()
    content["text"] = ConfigRecord({"text": "leaked sentence"})
    with pytest.raises(schema.SchemaError, match="reply records"):
        schema.parse_release(content, hidden_size=8, num_labels=2)
    with pytest.raises(schema.SchemaError, match="not part of the schema"):
        schema.release_content(*_release(), {"num-examples": 3, "num-tokens": 1, "token-0": 101})
    bad = _content()
    bad[schema.METRICS] = MetricRecord({"num-examples": 2.0, "num-tokens": 1.0})
    with pytest.raises(schema.SchemaError, match="num-examples=2"):
        schema.parse_release(bad, hidden_size=8, num_labels=2)


def test_instruction_roundtrip_and_errors():
    assert schema.read_instruction(schema.instruction(4, 8)) == (4, 8)
    with pytest.raises(schema.SchemaError):
        schema.read_instruction(RecordDict({}))
    with pytest.raises(schema.SchemaError, match="num-batches=-1"):
        schema.read_instruction(RecordDict({"config": ConfigRecord({"server-round": 1, "num-batches": -1})}))
    assert isinstance(ArrayRecord(), ArrayRecord)
