"""The noise is the device's secret: unpredictable to the cloud, released once, public-only replies."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from scipy import stats

from privtune_flwr import client_app as device_app
from privtune_flwr import device_runtime as runtime
from privtune_flwr import schema
from privtune_flwr.config import RunConfig
from privtune_flwr.defenses import build_defense
from privtune_flwr.device import DeviceSide
from privtune_flwr.device_policy import DevicePolicy, PolicyError
from privtune_flwr.mechanism.dchi import dchi_from_stream, sample_dchi
from privtune_flwr.mechanism.noise_key import NoiseKey, gamma_many
from privtune_flwr.models import load_split
from tests.conftest import tiny_hf_model

PERMISSIVE = {"allowed-defenses": "*", "max-epsilon": float("inf"), "key-store": "memory"}
PLAN = schema.Plan(hidden_size=384, num_labels=2, max_examples=4096, max_tokens=512)
TIMINGS = ("bottom-seconds", "defense-seconds")


# ------------------------------------------------------------------------------------- the key


def test_torch_manual_seed_keeps_only_32_bits_so_streams_load_the_whole_state():
    a = torch.randn(6, generator=torch.Generator().manual_seed(12345))
    b = torch.randn(6, generator=torch.Generator().manual_seed(12345 + 2**32))
    assert torch.equal(a, b)  # why a seed would be searchable
    key = NoiseKey.fresh()
    ids = np.arange(5)
    one, again = key.stream(b"ctx", ids), key.stream(b"ctx", ids)
    assert torch.equal(one.normal((4, 3)), again.normal((4, 3)))
    for other in (key.stream(b"ctx2", ids), key.stream(b"ctx", ids + 1), NoiseKey.fresh().stream(b"ctx", ids),
                  key.stream(b"ctx", ids, nonce=os.urandom(16))):
        assert not torch.equal(key.stream(b"ctx", ids).normal((4, 3)), other.normal((4, 3)))


def test_key_file_is_private_atomic_and_the_key_never_pickles(tmp_path):
    path = tmp_path / "sub" / "device.key"
    first = NoiseKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = NoiseKey.load_or_create(path)
    assert torch.equal(first.stream(b"c", [1, 2]).normal((3,)), again.stream(b"c", [1, 2]).normal((3,)))
    assert first.to_state().hex() not in repr(first) and "<secret>" in repr(first)
    with pytest.raises(TypeError, match="never leaves the device"):
        pickle.dumps(first)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        NoiseKey.load_or_create(path)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("d,eps", [(16, 1.0), (384, 10.0)])
def test_keyed_dchi_norms_are_gamma_and_directions_isotropic(d, eps, seeded_entropy):
    key = NoiseKey.fresh()
    draws = torch.cat([dchi_from_stream(key.stream(b"t", [i]), 20, d, eps) for i in range(150)])  # 3000 tokens
    norms = draws.norm(dim=-1).double().numpy()
    assert stats.kstest(norms, stats.gamma(a=d, scale=1 / eps).cdf).pvalue > 1e-3
    unit = draws / draws.norm(dim=-1, keepdim=True)
    assert unit.mean(0).abs().max() < 4 / np.sqrt(len(unit))  # 4 sd of a coordinate mean
    cov = (unit.T @ unit / len(unit)) * d
    assert (cov.diagonal() - 1).abs().mean() < 0.1
    # the batched sampler gives each row exactly what that example's stream gives alone
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    streams = [key.stream(b"t", [7]), key.stream(b"t", [8])]
    gauss, scale = __import__("privtune_flwr.mechanism.dchi", fromlist=["x"]).sample_dchi_keyed(streams, mask, d, eps)
    batched = gauss * scale.unsqueeze(-1)
    assert torch.equal(batched[0, :3], dchi_from_stream(key.stream(b"t", [7]), 3, d, eps))
    assert torch.equal(batched[1, 1:], dchi_from_stream(key.stream(b"t", [8]), 3, d, eps))
    assert (batched[0, 3] == 0).all() and (batched[1, 0] == 0).all()


@pytest.mark.parametrize("shape", [16.0, 384.0])
def test_marsaglia_tsang_gamma_matches_the_gamma_law(shape, seeded_entropy):
    key = NoiseKey.fresh()
    values = torch.cat(gamma_many([key.stream(b"g", [i]) for i in range(40)], [100] * 40, shape)).numpy()
    assert stats.kstest(values, stats.gamma(a=shape).cdf).pvalue > 1e-3
    # the reference (legacy, seeded) sampler draws the same law: two-sample check
    legacy = sample_dchi((4000,), int(shape), 1.0, generator=torch.Generator().manual_seed(0)).norm(dim=-1).numpy()
    assert stats.ks_2samp(values, legacy).pvalue > 1e-3


# ------------------------------------------------------------------------------------- the ClientApp


def _cfg(**kw):
    base = dict(max_examples=40, batch_size=4, batches_per_round=2, max_length=24, audit_tokens=0, defense="dchi",
                epsilon=50.0, eval_examples=6, devices_per_round=2, min_devices=2)
    base.update(kw)
    return RunConfig(**base)


def _device(cfg, pid=0, **node):
    node_config = {"partition-id": pid, "num-partitions": 2, **PERMISSIVE, **node}
    return Context(run_id=1, node_id=pid + 1, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())


def _send(context, kind, server_round, batches=2):
    msg = Message(content=schema.instruction(server_round, batches), message_type=kind, dst_node_id=context.node_id)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    reply = device_app.app(msg, context)
    assert not reply.has_error(), reply.error
    return schema.parse_release(reply.content, PLAN)


def _rows(rel) -> list[torch.Tensor]:
    """Each released sequence at its real positions only (padding widths differ between batches)."""
    return [rel.hidden[i][rel.attention_mask[i].bool()] for i in range(rel.num_examples)]


def _same(a: torch.Tensor, rows: list[torch.Tensor]) -> bool:
    return any(a.shape == b.shape and torch.equal(a, b) for b in rows)


def test_two_devices_two_rounds_two_runs(minilm_split):
    """Releases of the same text all differ, except the same example on the same device, which is
    bit-identical across rounds, epochs and evaluations."""
    cfg = _cfg()
    run1_a, run1_b = _device(cfg), _device(cfg)  # two devices holding the same partition (same texts)
    eval_a1 = _send(run1_a, MessageType.EVALUATE, 1)
    eval_a2 = _send(run1_a, MessageType.EVALUATE, 2)
    assert torch.equal(eval_a1.hidden, eval_a2.hidden)  # the test split re-sent: the same tensors
    assert eval_a2.metrics["releases-per-example-max"] == 1
    eval_b = _send(run1_b, MessageType.EVALUATE, 1)
    assert not any(_same(r, _rows(eval_a1)) for r in _rows(eval_b))
    # training, 8 examples per round: the rows past the first epoch re-send epoch-1 tensors exactly
    size = len(runtime.load_node(cfg, 0, 2).train)
    rounds = -(-size // 8) + 1
    sent = [row for r in range(1, rounds + 1) for row in _rows(_send(run1_a, MessageType.TRAIN, r))]
    first, later = sent[:size], sent[size:]
    assert len(later) >= 4 and all(_same(r, first) for r in later)
    assert sum(_same(r, first[:i] + first[i + 1:]) for i, r in enumerate(first)) == 0  # distinct examples differ
    train_a = [first]
    train_b = _rows(_send(run1_b, MessageType.TRAIN, 1)) + _rows(_send(run1_b, MessageType.TRAIN, 2))
    assert not any(_same(r, first) for r in train_b)
    # a second run: new simulated devices, new keys, new noise
    eval_a_run2 = _send(_device(cfg), MessageType.EVALUATE, 1)
    assert not any(_same(r, _rows(eval_a1)) for r in _rows(eval_a_run2))


def test_the_cloud_cannot_regenerate_the_noise_from_what_it_knows(minilm_split):
    """The old device seeded its generator from hash((seed, partition-id, round, phase)), all known
    to the cloud, which could regenerate z and subtract it. Doing so now recovers nothing: the
    "denoised" estimate is further from h than the release itself, and the regenerated noise is
    uncorrelated with the real one."""
    cfg = _cfg(eval_examples=12)
    context = _device(cfg, pid=1)
    released = _send(context, MessageType.EVALUATE, 1)
    node = runtime.load_node(cfg, 1, 2)
    rows = node.test.select(range(cfg.eval_examples))
    clean = DeviceSide(node.device.split, build_defense("none", split=node.device.split), max_length=cfg.max_length).release(rows["text"])
    assert torch.equal(clean.attention_mask, released.attention_mask)
    real = released.attention_mask.bool()
    true_noise = (released.hidden - clean.hidden)[real]
    best = float("inf")
    for server_round in range(1, 4):
        for phase in (0, 1):
            gen = torch.Generator().manual_seed(hash((cfg.seed, 1, server_round, phase)) & (2**62 - 1))
            guess = sample_dchi(tuple(released.hidden.shape[:2]), 384, cfg.epsilon, generator=gen)[real]
            residual = (true_noise - guess).norm(dim=-1).mean()
            best = min(best, float(residual / true_noise.norm(dim=-1).mean()))
            cos = torch.nn.functional.cosine_similarity(true_noise, guess, dim=-1)
            assert cos.mean().abs() < 0.05
    assert best > 1.2  # about sqrt(2): subtracting an independent draw adds noise


def test_a_device_refuses_reproducible_noise_unless_its_own_config_allows_it(minilm_split):
    cfg = _cfg(reproducible_noise=True)
    with pytest.raises(PolicyError, match="allow-reproducible-noise"):
        _send(_device(cfg), MessageType.EVALUATE, 1)
    # the run config cannot grant it: only the device's node config (or its own environment) can
    with pytest.raises(PolicyError, match="allow-reproducible-noise"):
        _send(_device(cfg, **{"allow-reproducible-noise": False}), MessageType.EVALUATE, 1)
    a = _send(_device(cfg, **{"allow-reproducible-noise": True}), MessageType.EVALUATE, 1)
    b = _send(_device(cfg, **{"allow-reproducible-noise": True}), MessageType.EVALUATE, 1)
    assert torch.equal(a.hidden, b.hidden)  # reproducible by whoever knows the seed: that is the point


def test_the_cloud_cannot_weaken_a_defence_through_its_parameters():
    """The run config is the cloud's: a per-token epsilon raised through s-min, a gaussian delta,
    or a label defence's rank (its protection against inversion) are checked against the floor."""
    default = DevicePolicy.from_sources({}, env={})
    default.check(RunConfig(defense="privtune"))  # s-min 0.5: the default floor's own value
    default.check(RunConfig(defense="gaussian"))
    default.check(RunConfig(defense="label-subspace", subspace_rank=2))
    with pytest.raises(PolicyError, match=r"defense.privtune.s-min=0.01 .*per-token epsilon of 6400\): its floor is min-noise-scale=0.5"):
        default.check(RunConfig(defense="privtune", s_min=0.01))
    with pytest.raises(PolicyError, match="min-noise-scale"):
        default.check(RunConfig(defense="privtune-sampled-target", s_min=0.25))
    default.check(RunConfig(defense="privtune-noimp", s_min=0.01))  # no importance: s = 1 for every token
    with pytest.raises(PolicyError, match="defense.gaussian.delta=0.5: its floor is max-delta=1e-05"):
        default.check(RunConfig(defense="gaussian", delta=0.5))
    for name in ("label-subspace", "label-obfuscator"):
        with pytest.raises(PolicyError, match=f"defense.label-subspace.rank=384 for defense.name='{name}'.*max-subspace-rank=2"):
            default.check(RunConfig(defense=name, subspace_rank=384))
    default.check(RunConfig(defense="dchi", subspace_rank=384))  # the rank means nothing to a noise defence
    with pytest.raises(PolicyError, match="defense.privtune.importance-levels=0.*allow-continuous-scales=true"):
        default.check(RunConfig(defense="privtune", importance_levels=0))
    with pytest.raises(PolicyError, match="defense.privtune.radius-scale=4.*max-radius-scale=1"):
        default.check(RunConfig(defense="privtune", radius_scale=4.0))
    default.check(RunConfig(defense="privtune-nomean", radius_scale=4.0))  # no mean shift, so no radius
    default.check(RunConfig(defense="dchi", radius_scale=4.0, importance_levels=0))  # neither means anything to d_chi
    with pytest.raises(PolicyError, match="model.split-layer=0 for defense.name='label-subspace'.*min-split-layer=1"):
        default.check(RunConfig(defense="label-subspace", split_layer=0))
    default.check(RunConfig(defense="label-subspace", split_layer=1))
    DevicePolicy.from_sources({"allowed-defenses": "*"}, env={}).check(RunConfig(defense="none", split_layer=0))
    DevicePolicy.from_sources({"min-split-layer": 0}, env={}).check(RunConfig(defense="dchi", split_layer=0))
    with pytest.raises(PolicyError, match="model.split-layer=2 .*min-split-layer=3"):
        DevicePolicy.from_sources({"min-split-layer": 3}, env={}).check(RunConfig(defense="dchi", split_layer=2))
    # the device, not the run config, raises its own floor
    loose = DevicePolicy.from_sources({"max-subspace-rank": 4, "min-noise-scale": 0.01, "max-delta": 0.5}, env={})
    loose.check(RunConfig(defense="label-subspace", subspace_rank=4))
    loose.check(RunConfig(defense="privtune", s_min=0.01))
    loose.check(RunConfig(defense="gaussian", delta=0.5))
    looser = DevicePolicy.from_sources({"allow-continuous-scales": True, "max-radius-scale": 4.0}, env={})
    looser.check(RunConfig(defense="privtune", importance_levels=0, radius_scale=4.0))
    for bad, match in (({"max-subspace-rank": 0}, "max-subspace-rank=0 must be an integer >= 1"),
                       ({"max-subspace-rank": True}, "max-subspace-rank=True"),
                       ({"min-split-layer": -1}, "min-split-layer=-1 must be an integer >= 0"),
                       ({"max-delta": 1.5}, r"max-delta=1.5 is outside the accepted range \(0, 1\)"),
                       ({"min-noise-scale": "many"}, "min-noise-scale='many' is not a number"),
                       ({"min-noise-scale": 0.0}, r"min-noise-scale=0.0 is outside the accepted range \(0, 1\]"),
                       ({"max-radius-scale": -1.0}, r"max-radius-scale=-1.0 is outside the accepted range \[0, inf\)"),
                       ({"allow-continuous-scales": "yes"}, "allow-continuous-scales='yes' must be true or false")):
        with pytest.raises(ValueError, match=match):
            DevicePolicy.from_mapping(bad)
    # values that would make the statement meaningless are refused by the config itself
    for key, value in (("s_min", 0.0), ("s_min", float("nan")), ("delta", 1.0), ("radius_scale", -1.0)):
        with pytest.raises(ValueError, match=f"{key.replace('_', '-')}=.* is outside the accepted range"):
            RunConfig(**{key: value})


def test_a_device_refuses_a_label_rank_above_its_floor(minilm_split):
    cfg = _cfg(defense="label-subspace", subspace_rank=8)
    with pytest.raises(PolicyError, match="max-subspace-rank=2"):
        _send(_device(cfg), MessageType.EVALUATE, 1)


def test_fresh_release_needs_consent_and_counts_every_release(minilm_split):
    cfg = _cfg(release="fresh")
    with pytest.raises(PolicyError, match="allow-fresh-noise"):
        _send(_device(cfg), MessageType.EVALUATE, 1)
    context = _device(cfg, **{"allow-fresh-noise": True, "max-releases-per-example": 2})
    one, two = _send(context, MessageType.EVALUATE, 1), _send(context, MessageType.EVALUATE, 2)
    real = one.attention_mask.bool()
    assert (one.hidden[real] != two.hidden[real]).any(-1).all()
    assert two.metrics["releases-per-example-max"] == 2
    with pytest.raises(PolicyError, match="already released 2 time.*max-releases-per-example=2"):
        _send(context, MessageType.EVALUATE, 3)  # a third fresh release is past the device's budget


def test_a_key_file_survives_a_restart_and_a_new_configuration_counts(minilm_split, tmp_path):
    cfg = _cfg()
    node = {"key-store": "file", "key-file": str(tmp_path / "k" / "device.key")}
    first = _send(_device(cfg, **node), MessageType.EVALUATE, 1)
    runtime.RUNTIME.file_keys.clear()  # a restarted device process: caches gone, the file stays
    runtime.RUNTIME.resources.clear("node")
    second = _send(_device(cfg, **node), MessageType.EVALUATE, 1)
    assert torch.equal(first.hidden, second.hidden) and second.metrics["releases-per-example-max"] == 1
    with pytest.raises(PolicyError, match="max-releases-per-example=1"):  # the default budget: one configuration, ever
        _send(_device(_cfg(epsilon=40.0), **node), MessageType.EVALUATE, 1)
    runtime.RUNTIME.file_keys.clear()  # the refusal was recorded nowhere: the ledger still holds one release
    other = _send(_device(_cfg(epsilon=40.0), **node, **{"max-releases-per-example": 2}), MessageType.EVALUATE, 1)
    assert other.metrics["releases-per-example-max"] == 2  # a second configuration is a second release


def _knn_recovery(cfg, pid, released) -> float:
    """Nearest-anchor token recovery of a release of device ``pid``'s test split (EIA-1)."""
    from privtune_flwr.attacks.inversion import context_free_anchors
    from privtune_flwr.mechanism.anchors import self_audit

    node = runtime.load_node(cfg, pid, 2)
    split = node.device.split
    rows = node.test.select(range(cfg.eval_examples))
    clean = DeviceSide(split, build_defense("none", split=split), max_length=cfg.max_length).release(rows["text"])
    assert torch.equal(clean.attention_mask, released.attention_mask)
    return self_audit(released.hidden, clean.input_ids, clean.attention_mask, context_free_anchors(split), split.special_ids)


def _jittered_probe(cfg, node: dict, *, new_run_each_time: bool, instructions: int = 16):
    """The cloud asks for the same test examples under epsilon 16, 15.999, 15.998, ... (dchi):
    each is a new configuration, so each accepted release carries new noise. Returns the releases
    the device sent and the refusals it gave."""
    context = _device(cfg, pid=1, **node)
    sent, refused = [], []
    for i in range(instructions):
        run = _cfg(**{**cfg.__dict__, "epsilon": 16.0 - 0.001 * i}).to_flower()
        if new_run_each_time:  # a deployed device: every run is a new context, the key file stays
            context = _device(cfg, pid=1, **node)
        context.run_config = run
        try:
            sent.append(_send(context, MessageType.EVALUATE, 1))
        except PolicyError as exc:
            refused.append(str(exc))
    return sent, refused


@pytest.mark.parametrize("store", ["memory", "file"])
def test_a_cloud_that_jitters_epsilon_gains_nothing_by_averaging(minilm_split, tmp_path, store):
    """Averaging fresh-noise releases of one example under near-identical configurations is the
    attack (with a budget of 16 the device allows it, and recovery rises); with the default budget
    the device releases each example under one configuration only and refuses the other 15, so
    the cloud's best estimate is the single release."""
    cfg = _cfg(split_layer=3, epsilon=16.0, eval_examples=12)  # the app's split: one release reads about 0.6
    node = {"key-store": store}
    if store == "file":
        node["key-file"] = str(tmp_path / "budget" / "device.key")
    sent, refused = _jittered_probe(cfg, node, new_run_each_time=store == "file")
    assert len(sent) == 1 and len(refused) == 15
    assert all("max-releases-per-example=1" in r and "already released 1 time" in r for r in refused)
    single = _knn_recovery(cfg, 1, sent[0])
    averaged = schema.Release(torch.stack([r.hidden for r in sent]).mean(0), sent[0].attention_mask, None, {})
    assert abs(_knn_recovery(cfg, 1, averaged) - single) <= 0.02

    # the same probe against a device whose budget allows it: averaging 16 releases recovers more
    loose = {**node, "max-releases-per-example": 16}
    if store == "file":
        loose["key-file"] = str(tmp_path / "loose" / "device.key")
    sent16, refused16 = _jittered_probe(cfg, loose, new_run_each_time=store == "file")
    assert len(sent16) == 16 and not refused16
    assert sent16[-1].metrics["releases-per-example-max"] == 16
    averaged16 = schema.Release(torch.stack([r.hidden for r in sent16]).mean(0), sent16[0].attention_mask, None, {})
    gain = _knn_recovery(cfg, 1, averaged16) - _knn_recovery(cfg, 1, sent16[0])
    assert gain > 0.2, gain  # measured 0.603 -> 0.927 (split 3, 12 test sentences)


def test_the_release_ledger_counts_examples_not_instructions(tmp_path):
    """Overlapping instructions: each example is charged once per configuration; a refused
    instruction records nothing; a first-format ledger (configurations only) counts for every
    example; an unreadable ledger is an error, never a fresh start."""
    from privtune_flwr.accounting import ReleaseBudgetExceeded, ReleaseLedger

    path = tmp_path / "k.ledger.json"
    ledger = ReleaseLedger(2, path)
    assert ledger.admit("A", ["x", "y"]) == 1
    assert ledger.admit("A", ["y", "z", "z"]) == 1  # y re-sent under A: not a new release
    assert ledger.admit("B", ["x"]) == 2
    with pytest.raises(ReleaseBudgetExceeded, match="1 of the 2 examples.*max-releases-per-example=2"):
        ledger.admit("C", ["x", "y"])
    assert ledger.releases("y") == 1 and ledger.releases("x") == 2  # nothing of the refused one was kept
    assert ReleaseLedger(2, path).releases("x") == 2  # persisted
    assert ledger.admit("C", ["y"], fresh=True) == 2
    with pytest.raises(ReleaseBudgetExceeded):
        ledger.admit("C", ["y"], fresh=True)  # fresh noise: every send is a release
    old = tmp_path / "old.ledger.json"
    old.write_text('["A"]')
    first = ReleaseLedger(2, old)
    assert first.releases("anything") == 1 and first.admit("A", ["new"]) == 1 and first.admit("B", ["new"]) == 2
    with pytest.raises(ReleaseBudgetExceeded):
        ReleaseLedger(1, old).admit("C", ["other"])
    broken = tmp_path / "broken.ledger.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="refuses to release until it is restored"):
        ReleaseLedger(1, broken)
    with pytest.raises(ValueError, match="max-releases-per-example=0 must be an integer >= 1"):
        ReleaseLedger(0)


# ------------------------------------------------------------------------------------- public replies


def test_no_reply_metric_varies_with_the_importance_of_the_tokens(minilm_split):
    split = minilm_split
    texts = ["a wonderful, moving film", "dull and far too long", "the plot is thin but the actors shine"]
    seen = []
    for imp in (torch.zeros(split.vocab_size), torch.ones(split.vocab_size),
                torch.rand(split.vocab_size, generator=torch.Generator().manual_seed(0))):
        defense = build_defense("privtune", epsilon=64.0, split=split, importance=imp, importance_levels=0)
        rel = DeviceSide(split, defense, max_length=32, audit_tokens=0).release(texts, [1, 0, 0])
        seen.append({k: v for k, v in rel.metrics.items() if k not in TIMINGS})
        assert set(rel.metrics) <= set(schema.REQUIRED_METRICS + schema.OPTIONAL_METRICS)
    assert seen[0] == seen[1] == seen[2]


def test_release_is_bit_identical_in_any_batch(minilm_split):
    split = minilm_split
    texts = ["a wonderful, moving film", "dull", "the plot is thin but the actors shine and the music soars",
             "ok", "an unexpectedly tender story about two brothers"]
    device = DeviceSide(split, build_defense("privtune", epsilon=64.0, split=split), max_length=32, audit_tokens=0)
    together = device.release(texts)
    for i, text in enumerate(texts):
        alone = device.release([text])
        mixed = device.release([texts[(i + 1) % 5], text, texts[(i + 3) % 5]])
        n = int(alone.attention_mask.sum())
        assert torch.equal(alone.hidden[0, :n], together.hidden[i, :n])
        assert torch.equal(alone.hidden[0, :n], mixed.hidden[1, :n])


def test_a_device_runs_one_example_per_call_unless_told_otherwise(minilm_split):
    """One example per call of the bottom: the shapes an example is computed with never depend on
    its batch, so no BLAS can round it differently beside other examples."""
    from privtune_flwr.device import ROWS_PER_CALL

    device = DeviceSide(minilm_split, build_defense("dchi", epsilon=8.0, split=minilm_split), max_length=32)
    assert ROWS_PER_CALL == 1 and device.chunk == 1
    calls = []
    bottom = minilm_split.bottom
    minilm_split.bottom = lambda ids, mask: calls.append(tuple(ids.shape)) or bottom(ids, mask)
    try:
        device.release(["dull", "ok", "a wonderful, moving film"])  # one padded width: one call each
    finally:
        minilm_split.bottom = bottom
    assert calls == [(1, 8)] * 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"chunk={bad!r} must be an integer >= 1"):
            DeviceSide(minilm_split, build_defense("none", split=minilm_split), max_length=32, chunk=bad)


def test_decoder_release_is_bit_identical_in_any_batch(minilm_tokenizer):
    """Left padding and real-token positions: the same for a decoder."""
    import copy

    split = load_split("tiny-llama", 1, hf_model=tiny_hf_model("decoder", layers=2), tokenizer=copy.deepcopy(minilm_tokenizer),
                       lora_rank=0)
    texts = ["a wonderful, moving film", "dull", "the plot is thin but the actors shine"]
    device = DeviceSide(split, build_defense("dchi", epsilon=8.0, split=split), max_length=24, audit_tokens=0)
    together = device.release(texts)
    alone = device.release([texts[1]])
    n = int(alone.attention_mask.sum())
    assert torch.equal(alone.hidden[0, -n:], together.hidden[1, -n:])
    assert (together.hidden[1, :-n] == 0).all()


# ------------------------------------------------------------------------------------- the floor


def test_device_policy_floor_and_its_sources():
    cfg = RunConfig()
    default = DevicePolicy.from_sources({}, env={})
    default.check(cfg)  # the default job (privtune at eps 64) passes the default floor
    with pytest.raises(PolicyError, match="defense.name='none'.*allowed-defenses"):
        default.check(RunConfig(defense="none"))
    with pytest.raises(PolicyError, match="defense.epsilon=128.*max-epsilon=64"):
        default.check(RunConfig(epsilon=128.0))
    with pytest.raises(PolicyError, match="data-dir"):
        default.check(RunConfig(dataset="/etc/passwd.csv"))
    with pytest.raises(PolicyError, match="allow-hub-datasets"):
        default.check(RunConfig(dataset="someone/private-data"))
    env = {"PRIVTUNE_DEVICE_POLICY": "max-epsilon=256 allowed-defenses='dchi,none'"}
    loose = DevicePolicy.from_sources({}, env=env)
    loose.check(RunConfig(defense="none"))
    loose.check(RunConfig(defense="dchi", epsilon=200.0))
    # the node config overrides the environment, key by key
    tight = DevicePolicy.from_sources({"max-epsilon": 16.0, "partition-id": 0}, env=env)
    with pytest.raises(PolicyError, match="max-epsilon=16"):
        tight.check(RunConfig(defense="dchi", epsilon=32.0))
    with pytest.raises(ValueError, match="max-epsilon='lots'"):
        DevicePolicy.from_mapping({"max-epsilon": "lots"})
    with pytest.raises(ValueError, match="unknown defences"):
        DevicePolicy.from_mapping({"allowed-defenses": "dchi,laplace"})
    with pytest.raises(ValueError, match="allow-fresh-noise='yes' must be true or false"):
        DevicePolicy.from_mapping({"allow-fresh-noise": "yes"})


def test_the_self_audits_token_sample_comes_from_the_devices_key(minilm_split, monkeypatch):
    """Which tokens the self-audit scores is drawn from the device's key: a cloud that knows the
    batch cannot tell which positions a reported rate is about. The same key samples the same
    tokens of a batch; another key samples others."""
    from privtune_flwr import device as device_module
    from privtune_flwr.mechanism import anchors as anc

    seen = []
    monkeypatch.setattr(anc, "self_audit", lambda released, ids, *rest: seen.append(ids.flatten().tolist()) or 0.0)
    ids = torch.arange(1000, 1060).reshape(3, 20)
    mask = torch.ones_like(ids)
    released = torch.zeros(3, 20, minilm_split.hidden_size)
    anchors = torch.zeros(2000, minilm_split.hidden_size)

    def audited(key):
        defense = build_defense("dchi", epsilon=8.0, split=minilm_split, key=key)
        side = device_module.DeviceSide(minilm_split, defense, max_length=24, audit_tokens=8, anchors=anchors)
        side.self_audit(released, ids, mask)
        return seen[-1]

    a, b = NoiseKey.from_seed(1), NoiseKey.from_seed(2)
    first, again, other = audited(a), audited(a), audited(b)
    assert len(first) == 8 and first == again and first != other
    assert first != ids.flatten()[torch.randperm(60, generator=torch.Generator().manual_seed(60))[:8]].tolist()
