"""The message schema shared by the device (ClientApp) and the cloud (strategy).

Vanilla protocol, one round::

    cloud -> device  "train" / "evaluate"   config  : ConfigRecord  {server-round, num-batches}
    device -> cloud  reply                  released: ArrayRecord   {hidden, attention-mask, labels}
                                            metrics : MetricRecord  {num-examples, num-tokens, ...}

U-shaped protocol (labels and the loss stay on the device), one training step::

    cloud -> device  "train.forward"        config  : {server-round, step}
    device -> cloud  reply                  released: {hidden, attention-mask}    metrics
    cloud -> device  "train.head"           config  : {server-round, step}   outputs: {outputs [N, T, d]}
    device -> cloud  reply                  gradient: {gradient [N, T, d]}        metrics: {num-examples, loss}

Evaluation is the same with "evaluate.forward" / "evaluate.head" (the head reply carries only
metrics). Generation samples: "evaluate.prompt" (release of a few prompts), "evaluate.next"
(outputs at the last position; the reply releases the new token's representation only), and
"evaluate.finish" (aggregate scores). The device keeps what it generated.

Once per device, before it is first sampled::

    cloud -> device  "query"                (empty)
    device -> cloud  reply                  device  : MetricRecord  {partition-id, num-partitions}

so that the cloud orders devices by their data partition, not by the node ids Flower draws at
random for every run (a seeded run then samples and trains in the same order each time).

Nothing else travels: no token ids, no text, no labels in u-shaped replies, no anchors of the
device's tokens. The cloud checks every reply against this schema (:func:`parse_release`,
:func:`parse_gradient`) and rejects anything else.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

CONFIG = "config"
RELEASED = "released"
METRICS = "metrics"
DEVICE = "device"

HIDDEN = "hidden"  # float32 (or float16: federation.transport-dtype) [N, T, d], zero at padding
MASK = "attention-mask"  # int8 [N, T], 1 = real token
LABELS = "labels"  # int64 [N]
RELEASE_ARRAYS = {HIDDEN: np.dtype("float32"), MASK: np.dtype("int8"), LABELS: np.dtype("int64")}
# How the released representations travel: float16 halves the bytes; the noise is drawn and added
# in float32 first, so the rounding is post-processing of the release (the statement is unchanged).
TRANSPORT_DTYPES = {"float32": np.dtype("float32"), "float16": np.dtype("float16")}

# Device metrics: public numbers only. Counts, timings, the configuration's public bounds (functions
# of the run config and of the real-token counts, which the mask shows anyway), and one aggregate
# self-audit rate. No statistic of the private tokens' importance ever appears here.
REQUIRED_METRICS = ("num-examples", "num-tokens")
OPTIONAL_METRICS = (
    "self-audit-knn",  # KNN top-1 token recovery on this release (the device knows the truth)
    "bytes-sent",
    "bottom-seconds",
    "defense-seconds",
    "serialise-seconds",  # packing the release into Flower's records (the arrays' copies), on the device
    "epsilon-token-max",  # epsilon / s_min: the largest per-token parameter of the configuration
    "slack-token-max",  # 2 r epsilon / s_min
    "epsilon-sequence-max",  # longest sequence in the reply x epsilon-token-max
    "slack-sequence-max",
    "shift-radius",  # r, the bound on PrivTune's mean shift (from the public anchor tables)
    "releases-per-example-max",  # distinct releases of any one example (1 with release once)
)


class SchemaError(ValueError):
    """A reply that does not follow the schema; the message says what is wrong."""


@dataclass
class Release:
    hidden: torch.Tensor  # [N, T, d] float32
    attention_mask: torch.Tensor  # [N, T] long
    labels: torch.Tensor | None  # [N] long (vanilla protocol); None (u-shaped: labels stay on the device)
    metrics: dict[str, float]

    @property
    def num_examples(self) -> int:
        return int(self.hidden.shape[0])


def instruction(server_round: int, num_batches: int) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({"server-round": int(server_round), "num-batches": int(num_batches)})})


MAX_BATCHES_PER_INSTRUCTION = 4096


INSTRUCTION_KEYS = ("server-round", "num-batches", "step")  # "step": u-shaped instructions only


def read_instruction(content: RecordDict, *, records: tuple[str, ...] | None = None) -> tuple[int, int]:
    """``(server-round, num-batches)`` of an instruction; :class:`SchemaError` for anything else.

    ``records``: the only records the instruction may carry (a device passes what its handler
    reads, and refuses anything more rather than ignore it); None checks the config alone."""
    if not isinstance(content, RecordDict) or CONFIG not in content.config_records:
        raise SchemaError(f"instruction lacks the {CONFIG!r} ConfigRecord")
    if records is not None and not set(content.keys()) <= set(records):
        raise SchemaError(f"instruction carries records {sorted(set(content.keys()) - set(records))} that this "
                          f"instruction does not have (accepted: {sorted(records)})")
    config = content.config_records[CONFIG]
    extra = set(config.keys()) - set(INSTRUCTION_KEYS)
    if extra:
        raise SchemaError(f"instruction config carries unexpected keys {sorted(extra)}; accepted: {', '.join(INSTRUCTION_KEYS)}")
    values = []
    for key in ("server-round", "num-batches"):
        value = config.get(key) if hasattr(config, "get") else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"instruction {key}={value!r} must be an integer")
        values.append(value)
    server_round, num_batches = values
    if not 1 <= server_round <= 1_000_000:
        raise SchemaError(f"server-round={server_round} is outside the accepted range 1..1000000")
    if not 0 <= num_batches <= MAX_BATCHES_PER_INSTRUCTION:
        raise SchemaError(f"num-batches={num_batches} is outside the accepted range 0..{MAX_BATCHES_PER_INSTRUCTION}")
    return server_round, num_batches


def release_content(hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                    metrics: dict[str, float], *, transport: str = "float32") -> RecordDict:
    """Pack a device release. ``hidden`` must already be zero at padding; ``labels`` None for the
    u-shaped protocol (labels never leave the device); ``transport``: a key of
    :data:`TRANSPORT_DTYPES`, the dtype ``hidden`` travels in."""
    if transport not in TRANSPORT_DTYPES:
        raise ValueError(f"federation.transport-dtype={transport!r} is not accepted; accepted: {', '.join(TRANSPORT_DTYPES)}")
    started = time.perf_counter()
    values = hidden.detach().to(torch.float32).contiguous().numpy()
    if transport != "float32":
        limit = float(np.finfo(TRANSPORT_DTYPES[transport]).max)
        if np.abs(values).max(initial=0.0) > limit:
            raise ValueError(f"a released value of magnitude {float(np.abs(values).max()):.4g} exceeds {transport}'s range "
                             f"(+-{limit:g}); use federation.transport-dtype='float32'")
        values = values.astype(TRANSPORT_DTYPES[transport])
    arrays = {
        HIDDEN: Array(values),
        MASK: Array(attention_mask.detach().to(torch.int8).contiguous().numpy()),
    }
    if labels is not None:
        arrays[LABELS] = Array(labels.detach().to(torch.int64).contiguous().numpy())
    arrays = ArrayRecord(arrays)
    unknown = set(metrics) - set(REQUIRED_METRICS) - set(OPTIONAL_METRICS)
    if unknown:
        raise SchemaError(f"metrics {sorted(unknown)} are not part of the schema")
    metrics = {**metrics, "serialise-seconds": time.perf_counter() - started}
    return RecordDict({RELEASED: arrays, METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})


# Each public metric and the values it may take: (low, high, integer).
METRIC_RANGES: dict[str, tuple[float, float, bool]] = {
    "num-examples": (1, math.inf, True),
    "num-tokens": (1, math.inf, True),
    "self-audit-knn": (0.0, 1.0, False),
    "bytes-sent": (0.0, math.inf, False),
    "bottom-seconds": (0.0, math.inf, False),
    "defense-seconds": (0.0, math.inf, False),
    "serialise-seconds": (0.0, math.inf, False),
    "epsilon-token-max": (0.0, math.inf, False),
    "slack-token-max": (0.0, math.inf, False),
    "epsilon-sequence-max": (0.0, math.inf, False),
    "slack-sequence-max": (0.0, math.inf, False),
    "shift-radius": (0.0, math.inf, False),
    "releases-per-example-max": (1, math.inf, True),
}
assert set(METRIC_RANGES) == set(REQUIRED_METRICS + OPTIONAL_METRICS)


@dataclass(frozen=True)
class Plan:
    """What the cloud asked for: a reply beyond it is rejected before its arrays are read."""

    hidden_size: int
    num_labels: int  # 0: the reply must carry no labels (u-shaped)
    max_examples: int
    max_tokens: int
    max_abs: float = 1e6  # no representation coordinate is this large unless something is wrong
    # the defence's public envelope (privtune_flwr.envelope): no real token's norm exceeds it in an
    # honest release (except with probability < 1e-12 per token); inf = no envelope
    max_token_norm: float = math.inf
    transport: str = "float32"  # the dtype the representations travel in (TRANSPORT_DTYPES)

    def max_bytes(self) -> int:
        """Bytes the release's arrays may hold (npy headers included)."""
        n, t = self.max_examples, self.max_tokens
        width = TRANSPORT_DTYPES[self.transport].itemsize
        return n * t * self.hidden_size * width + n * t + n * 8 + 3 * NPY_HEADER_MAX


NPY_HEADER_MAX = 4096
# What a reply may hold beside its arrays: its metrics and config records (a few dozen numbers).
REPLY_RECORDS_SLACK = 1 << 20


def content_bytes(content) -> int:
    """The payload bytes of a reply's content, counted without trusting it: every array's data,
    every config value's bytes or characters (lists summed), 8 per metric value. A value that
    cannot be sized counts as 0 here; the schema then rejects the reply when it is parsed."""
    def value_bytes(value) -> int:
        if isinstance(value, (bytes, bytearray, str)):
            return len(value)
        if isinstance(value, (list, tuple)):
            return sum(value_bytes(v) for v in value)
        return 8

    total = 0
    try:
        for record in content.array_records.values():
            total += sum(len(a.data) for a in record.values() if isinstance(getattr(a, "data", None), (bytes, bytearray)))
        for record in content.config_records.values():
            total += sum(len(k) + value_bytes(v) for k, v in record.items())
        for record in content.metric_records.values():
            total += sum(len(k) + value_bytes(v) for k, v in record.items())
    except Exception:  # noqa: BLE001 - a content that cannot be walked is the schema's to reject
        return total
    return total


def declared_bytes(shape: tuple[int, ...], dtype: np.dtype, *, name: str, max_bytes: int) -> int:
    """Bytes an array of ``shape`` and ``dtype`` needs, in exact Python integers.

    ``np.prod(..., dtype=int64)`` wraps: a declared ``(2**32, 2**32)`` multiplies to 0 and would
    pass an exact-byte check on an empty payload. Python integers do not overflow, so a shape
    whose size exceeds what the plan allows (or anything addressable) is refused here, by name,
    before a byte of the payload is looked at."""
    count = math.prod(int(s) for s in shape)
    needed = count * dtype.itemsize
    if needed > max_bytes:
        limit = "more than any array can hold" if needed > np.iinfo(np.int64).max else f"more than the {max_bytes} allowed"
        raise SchemaError(f"{name} declares shape {shape} = {count} elements of {dtype} ({needed} bytes), {limit}; "
                          f"accepted: at most {max_bytes} bytes")
    return needed


def read_array(array: Array, name: str, dtype: np.dtype, ndim: int, max_bytes: int) -> np.ndarray:
    """An npy payload, parsed without trusting it: metadata and header must agree with the schema
    (dtype, byte order, rank, shape, C order) and the byte count must be exact. Never unpickles;
    the size is checked before anything is parsed."""
    if not isinstance(array, Array):
        raise SchemaError(f"{name} is a {type(array).__name__}, not an Array")
    if array.stype != "numpy.ndarray":
        raise SchemaError(f"{name} has serialisation type {array.stype!r}; the schema says 'numpy.ndarray'")
    data = array.data
    if not isinstance(data, (bytes, bytearray)) or len(data) > max_bytes:
        raise SchemaError(f"{name} holds {len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes; "
                          f"this round's plan allows at most {max_bytes}")
    try:
        meta_dtype = np.dtype(array.dtype)
    except TypeError:
        raise SchemaError(f"{name} declares dtype {array.dtype!r}, which is not a dtype") from None
    if meta_dtype != dtype:
        raise SchemaError(f"{name} has dtype {array.dtype}; the schema says {dtype}")
    shape = tuple(array.shape)
    if len(shape) != ndim or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise SchemaError(f"{name} declares shape {shape}; the schema says rank {ndim}")
    expected = declared_bytes(shape, dtype, name=name, max_bytes=max_bytes)
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            head_shape, fortran, head_dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=NPY_HEADER_MAX)
        elif version == (2, 0):
            head_shape, fortran, head_dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=NPY_HEADER_MAX)
        else:
            raise SchemaError(f"{name} is npy version {version}; accepted: 1.0, 2.0")
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unparseable is a rejection
        raise SchemaError(f"{name} is not a plain npy array: {type(exc).__name__}: {exc}") from None
    if head_dtype != dtype or head_dtype.byteorder not in ("=", "<", "|") or fortran or tuple(head_shape) != shape:
        raise SchemaError(f"{name}'s payload is {head_dtype.str} {tuple(head_shape)}{' (Fortran order)' if fortran else ''}; "
                          f"its metadata says {dtype.str} {shape}")
    payload = memoryview(data)[buf.tell():]
    if len(payload) != expected:
        raise SchemaError(f"{name} carries {len(payload)} payload bytes; {shape} of {dtype} needs {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def check_metrics(metrics: dict, *, examples: int, tokens: int) -> dict[str, float]:
    """Every metric of the schema, of the right type and range, consistent with the arrays."""
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    unknown = sorted(set(metrics) - set(METRIC_RANGES))
    if missing or unknown:
        raise SchemaError(f"metrics: missing {missing}, not in the schema {unknown}")
    out = {}
    for key, value in metrics.items():
        low, high, integer = METRIC_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(f"metric {key}={value!r} is not a finite number")
        if not low <= value <= high or (integer and float(value) != int(value)):
            kind = "an integer" if integer else "a number"
            raise SchemaError(f"metric {key}={value!r} is outside the accepted range: {kind} in [{low}, {high}]")
        out[key] = float(value)
    if out["num-examples"] != examples:
        raise SchemaError(f"num-examples={metrics['num-examples']} but the release holds {examples} sequences")
    if out["num-tokens"] != tokens:
        raise SchemaError(f"num-tokens={metrics['num-tokens']} but the attention mask holds {tokens} real tokens")
    return out


def parse_release(content: RecordDict, plan: Plan) -> Release:
    """Validate a device reply against the schema and ``plan``; return its tensors.

    Raises :class:`SchemaError` for anything else, whatever the reply holds: no exception of any
    other type escapes (a hostile reply is a rejection, never a crashed round).
    """
    try:
        return _parse_release(content, plan)
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SchemaError(f"unparseable reply: {type(exc).__name__}: {exc}") from None


def _parse_release(content: RecordDict, plan: Plan) -> Release:
    if not isinstance(content, RecordDict):
        raise SchemaError(f"reply content is a {type(content).__name__}, not a RecordDict")
    if set(content.keys()) != {RELEASED, METRICS}:
        raise SchemaError(f"reply records {sorted(content.keys())} differ from the schema's {[METRICS, RELEASED]}")
    if RELEASED not in content.array_records or METRICS not in content.metric_records:
        raise SchemaError(f"reply needs ArrayRecord {RELEASED!r} and MetricRecord {METRICS!r}")
    record = content.array_records[RELEASED]
    wanted = {k: v for k, v in RELEASE_ARRAYS.items() if plan.num_labels or k != LABELS}
    wanted[HIDDEN] = TRANSPORT_DTYPES[plan.transport]
    if set(record.keys()) != set(wanted):
        raise SchemaError(f"release arrays {sorted(record.keys())} differ from the schema's {sorted(wanted)}")
    budget = plan.max_bytes()
    total = sum(len(record[k].data) for k in wanted if isinstance(getattr(record[k], "data", None), (bytes, bytearray)))
    if total > budget:
        raise SchemaError(f"release holds {total} bytes; this round's plan allows at most {budget}")
    ranks = {HIDDEN: 3, MASK: 2, LABELS: 1}
    arrays = {k: read_array(record[k], k, dtype, ranks[k], budget) for k, dtype in wanted.items()}
    hidden, mask = arrays[HIDDEN].astype(np.float32, copy=False), arrays[MASK]
    if hidden.shape[2] != plan.hidden_size:
        raise SchemaError(f"hidden has shape {hidden.shape}; expected [N, T, {plan.hidden_size}]")
    n, t = hidden.shape[:2]
    if n == 0 or t == 0:
        raise SchemaError(f"release is empty (hidden shape {hidden.shape})")
    if n > plan.max_examples or t > plan.max_tokens:
        raise SchemaError(f"release holds {n} sequences of {t} tokens; this round's plan allows at most "
                          f"{plan.max_examples} of {plan.max_tokens}")
    if mask.shape != (n, t):
        raise SchemaError(f"attention-mask {mask.shape} does not match hidden {hidden.shape}")
    labels = arrays.get(LABELS)
    if labels is not None and labels.shape != (n,):
        raise SchemaError(f"labels {labels.shape} do not match hidden {hidden.shape}")
    if not np.isfinite(hidden).all():
        raise SchemaError(f"hidden holds {int((~np.isfinite(hidden)).sum())} non-finite values")
    if np.abs(hidden).max(initial=0.0) > plan.max_abs:
        raise SchemaError(f"hidden holds values up to {float(np.abs(hidden).max()):.3g}; accepted: |value| <= {plan.max_abs:g}")
    if not np.isin(mask, (0, 1)).all() or (mask.sum(1) == 0).any():
        raise SchemaError("attention-mask must be 0/1 with at least one real token per sequence")
    if math.isfinite(plan.max_token_norm):
        norms = np.sqrt((hidden.astype(np.float64) ** 2).sum(-1))[mask == 1]
        if norms.max(initial=0.0) > plan.max_token_norm:
            raise SchemaError(f"hidden holds {int((norms > plan.max_token_norm).sum())} token(s) of norm up to "
                              f"{float(norms.max()):.4g}, outside the defence's envelope: accepted token norm <= "
                              f"{plan.max_token_norm:.4g}")
    if np.abs(hidden[mask == 0]).max(initial=0.0) != 0.0:
        raise SchemaError("hidden is not zero at padding positions")
    if labels is not None and (labels.min() < 0 or labels.max() >= plan.num_labels):
        raise SchemaError(f"labels span {labels.min()}..{labels.max()}; accepted: 0..{plan.num_labels - 1}")
    metrics = check_metrics(dict(content.metric_records[METRICS]), examples=n, tokens=int(mask.sum()))
    return Release(
        hidden=torch.from_numpy(hidden.copy()),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        labels=None if labels is None else torch.from_numpy(labels.copy()),
        metrics=metrics,
    )


# ------------------------------------------------------------------------------------------------
# u-shaped steps
# ------------------------------------------------------------------------------------------------

OUTPUTS = "outputs"  # cloud -> device: float32 [N, T, d], the middle's outputs for the device's release
GRADIENT = "gradient"  # device -> cloud: float32 [N, T, d], d loss / d outputs
HEAD_METRICS = {"num-examples": (1, math.inf, True), "loss": (0.0, math.inf, False), "accuracy": (0.0, 1.0, False),
                "macro-f1": (0.0, 1.0, False), "perplexity": (1.0, math.inf, False), "rouge-l": (0.0, 1.0, False),
                "num-tokens": (0, math.inf, True)}


def step_instruction(server_round: int, step: int, outputs: torch.Tensor | None = None) -> RecordDict:
    """A u-shaped instruction; ``outputs`` (the middle's, for the device's last release) if any."""
    content = RecordDict({CONFIG: ConfigRecord({"server-round": int(server_round), "num-batches": 1, "step": int(step)})})
    if outputs is not None:
        content[OUTPUTS] = ArrayRecord({OUTPUTS: Array(outputs.detach().to(torch.float32).contiguous().numpy())})
    return content


def _matching_array(content: RecordDict, name: str, shape: tuple[int, ...], kind: str, mismatch: str,
                    non_finite: str, max_abs: float | None = None) -> torch.Tensor:
    """The float32 array ``name`` of ``content``, which must have exactly ``shape`` (what the other
    side was sent), be finite and (``max_abs``) within ``|value| <= max_abs``; read within the
    bytes that shape needs."""
    record = content.array_records.get(name)
    if record is None or set(record.keys()) != {name}:
        raise SchemaError(f"{kind} needs ArrayRecord {name!r} holding {name!r}")
    budget = math.prod(int(s) for s in shape) * 4 + NPY_HEADER_MAX
    values = read_array(record[name], name, np.dtype("float32"), len(shape), budget)
    if values.shape != tuple(shape):
        raise SchemaError(mismatch.format(values.shape, tuple(shape)))
    accepted = "finite values" + ("" if max_abs is None else f" with |value| <= {max_abs:g}")
    bad = ~np.isfinite(values)
    if bad.any():
        raise SchemaError(f"{non_finite}: {int(bad.sum())} of {values.size} (first: {float(values[bad][0])}); "
                          f"accepted: {accepted}")
    if max_abs is not None:
        largest = float(np.abs(values).max(initial=0.0))
        if largest > max_abs:
            raise SchemaError(f"{name} hold values up to {largest:.4g}; accepted: {accepted}")
    return torch.from_numpy(values.copy())


def read_step(content: RecordDict, *, shape: tuple[int, ...] | None = None,
              max_abs: float | None = None) -> tuple[int, int, torch.Tensor | None]:
    """``(server-round, step, outputs)`` of a u-shaped instruction. ``shape``: the outputs the device
    expects (its own pending release's ``[N, T, d]``); None when the instruction carries none.
    ``max_abs``: the largest coordinate the device accepts in them (its head's public input range,
    :attr:`~privtune_flwr.device.DeviceHead.max_abs`); None checks finiteness only."""
    server_round, _ = read_instruction(content)
    step = content.config_records[CONFIG].get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 1_000_000:
        raise SchemaError(f"step={step!r} must be an integer in 0..1000000")
    expected = {CONFIG} | ({OUTPUTS} if shape is not None else set())
    if set(content.keys()) != expected:
        raise SchemaError(f"instruction records {sorted(content.keys())} differ from the schema's {sorted(expected)}")
    if shape is None:
        return server_round, step, None
    outputs = _matching_array(content, OUTPUTS, shape, "instruction", "outputs have shape {}; this device released {}",
                              "outputs hold non-finite values", max_abs=max_abs)
    return server_round, step, outputs


def _head_metrics(metrics: dict[str, float]) -> MetricRecord:
    unknown = set(metrics) - set(HEAD_METRICS)
    if unknown:
        raise SchemaError(f"metrics {sorted(unknown)} are not part of the schema")
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def gradient_content(gradient: torch.Tensor, metrics: dict[str, float]) -> RecordDict:
    """A device's answer to "train.head": the gradient for the outputs it was sent, and public
    metrics (the batch's mean loss)."""
    return RecordDict({GRADIENT: ArrayRecord({GRADIENT: Array(gradient.detach().to(torch.float32).contiguous().numpy())}),
                       METRICS: _head_metrics(metrics)})


def head_metrics_content(metrics: dict[str, float]) -> RecordDict:
    """A device's answer to "evaluate.head" / "evaluate.finish": aggregate scores only."""
    return RecordDict({METRICS: _head_metrics(metrics)})


def parse_head_metrics(content: RecordDict, *, examples: int | None = None) -> dict[str, float]:
    """The metrics of a head reply, each of the right type and range."""
    try:
        if not isinstance(content, RecordDict) or set(content.keys()) - {METRICS, GRADIENT} or METRICS not in content.metric_records:
            raise SchemaError(f"reply records {sorted(getattr(content, 'keys', lambda: [])())} lack MetricRecord {METRICS!r}")
        out = {}
        for key, value in dict(content.metric_records[METRICS]).items():
            if key not in HEAD_METRICS:
                raise SchemaError(f"metric {key!r} is not part of the schema")
            low, high, integer = HEAD_METRICS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high or (integer and float(value) != int(value)):
                raise SchemaError(f"metric {key}={value!r} is outside the accepted range [{low}, {high}]")
            out[key] = float(value)
        if "num-examples" not in out or (examples is not None and out["num-examples"] != examples):
            raise SchemaError(f"num-examples={out.get('num-examples')!r}; expected {examples}")
        return out
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SchemaError(f"unparseable reply: {type(exc).__name__}: {exc}") from None


def parse_gradient(content: RecordDict, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, float]]:
    """The gradient in a "train.head" reply, which must match the ``shape`` of the outputs sent."""
    try:
        if not isinstance(content, RecordDict) or set(content.keys()) != {GRADIENT, METRICS}:
            raise SchemaError(f"reply records {sorted(content.keys())} differ from the schema's {[GRADIENT, METRICS]}")
        grad = _matching_array(content, GRADIENT, shape, "reply", "gradient has shape {}; the outputs sent were {}",
                               "gradient holds non-finite values")
        metrics = parse_head_metrics(content, examples=shape[0])
        return grad, metrics
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SchemaError(f"unparseable reply: {type(exc).__name__}: {exc}") from None
def device_identity(partition_id: int, num_partitions: int) -> RecordDict:
    """A device's answer to the cloud's query: which partition of the data it holds."""
    return RecordDict({DEVICE: MetricRecord({"partition-id": int(partition_id), "num-partitions": int(num_partitions)})})


def read_device_identity(content: RecordDict) -> int:
    """The partition id in a device's answer; :class:`SchemaError` if the answer is malformed."""
    if set(content.keys()) != {DEVICE} or DEVICE not in content.metric_records:
        raise SchemaError(f"identity reply records {sorted(content.keys())} differ from the schema's [{DEVICE!r}]")
    record = content.metric_records[DEVICE]
    try:
        pid, total = int(record["partition-id"]), int(record["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"identity reply is malformed: {exc}") from None
    if not 0 <= pid < total:
        raise SchemaError(f"partition-id={pid} is outside 0..{total - 1}")
    return pid
