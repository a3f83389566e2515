"""u-shaped label protection: the mathematics of each method, the device floor, and that the
attacks of simulations.label_leakage lose what they recover without it."""

from __future__ import annotations

import math

import pytest
import torch

from privtune_flwr.attacks.gradient import label_inference, learned_attack, norm_attack
from privtune_flwr.config import LABEL_PROTECTIONS, RunConfig
from privtune_flwr.device_policy import DevicePolicy, PolicyError
from privtune_flwr.label_protection import METHODS, LabelProtection, rr_keep_probability, rr_with_prior_k
from privtune_flwr.mechanism.noise_key import NoiseKey


def test_names_agree():
    assert LABEL_PROTECTIONS == METHODS


def _synthetic_steps(steps=30, n=16, d=32, seed=0, protection=None):
    """Gradients of a linear binary head: (p - y) * w + small noise, at position 0 of [N, 4, d]."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)
    out = []
    for _ in range(steps):
        y = torch.randint(0, 2, (n,), generator=gen)
        p = torch.rand(n, generator=gen) * 0.6 + 0.2
        g = torch.zeros(n, 4, d)
        g[:, 0] = (p - y.float())[:, None] * w[None] + 0.02 * torch.randn(n, d, generator=gen)
        if protection is not None:
            g = protection.protect_gradient(g, y)
        out.append((g, y))
    return out


def test_randomised_response_flip_rate_matches_epsilon(seeded_entropy):
    """Per-example keep probability e^eps / (e^eps + 1); checked with a binomial z-test."""
    eps = 1.0
    prot = LabelProtection("randomised-response", epsilon=eps, key=NoiseKey.fresh())
    n = 4000
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1))
    ids = [[101, i // 256, i % 256, 102] for i in range(n)]
    noisy = prot.randomise_labels(labels, ids)
    keep = float((noisy == labels).double().mean())
    expected = rr_keep_probability(eps, 2)
    assert abs(keep - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (keep, expected)
    # release once: the same example always gets the same randomised label
    assert torch.equal(prot.randomise_labels(labels, ids), noisy)
    # the empirical likelihood ratio is within e^eps (label DP's definition, per output)
    assert keep / (1 - keep) <= math.exp(eps) * 1.15


def test_rr_with_prior_picks_k_and_stays_in_top_k():
    assert rr_with_prior_k(1.0, torch.tensor([0.5, 0.5])) == 2
    assert rr_with_prior_k(0.1, torch.tensor([0.9, 0.05, 0.05])) == 1
    prot = LabelProtection("randomised-response", epsilon=0.1, num_labels=3, prior=[0.9, 0.05, 0.05],
                           key=NoiseKey.from_seed(0))
    out = prot.randomise_labels(torch.tensor([0, 1, 2, 2]), [[1, i] for i in range(4)])
    assert out.tolist() == [0, 0, 0, 0]  # k = 1: everything reports the top class


def test_max_norm_equalises_expected_norms_and_marvell_hides_the_direction():
    clean = _synthetic_steps()
    assert label_inference(clean)["accuracy"] > 0.95
    assert norm_attack(clean)["auc"] > 0.5
    maxnorm = LabelProtection("max-norm", key=NoiseKey.from_seed(1))
    g = clean[0][0]
    out = maxnorm.protect_gradient(g, clean[0][1])
    assert torch.equal(out[:, 1:], g[:, 1:])  # noise only on the gradient's support
    # E||g + noise||^2 = max ||g||^2: averaged over many draws
    norms = torch.stack([maxnorm.protect_gradient(g, clean[0][1])[:, 0].norm(dim=1) ** 2 for _ in range(200)]).mean(0)
    target = (g[:, 0].norm(dim=1) ** 2).max()
    assert torch.allclose(norms, target.expand_as(norms), rtol=0.08)
    marvell = LabelProtection("marvell", noise=8.0, key=NoiseKey.from_seed(2))
    protected = _synthetic_steps(steps=60, protection=marvell)
    aux = _synthetic_steps(steps=60, seed=0, protection=LabelProtection("marvell", noise=8.0, key=NoiseKey.from_seed(3)))
    assert label_inference(protected)["accuracy"] < 0.62
    assert norm_attack(protected)["auc"] < 0.6
    assert learned_attack(aux, protected)["auc"] < 0.62
    # unprotected, the learned attack (same head direction in aux and victim) recovers labels
    assert learned_attack(_synthetic_steps(seed=0), clean)["auc"] > 0.95


def test_ranges_are_checked_in_the_run_config():
    with pytest.raises(ValueError, match="label-protection.method='dp' is outside the accepted range"):
        RunConfig(protocol="u-shaped", label_protection="dp")
    with pytest.raises(ValueError, match="label-protection.epsilon=0.0 is outside the accepted range"):
        RunConfig(protocol="u-shaped", label_protection="randomised-response", label_epsilon=0.0)
    with pytest.raises(ValueError, match="label-protection.noise=-1.0 is outside the accepted range"):
        RunConfig(protocol="u-shaped", label_protection="marvell", label_noise=-1.0)
    with pytest.raises(ValueError, match="'none' with federation.protocol='vanilla'"):
        RunConfig(label_protection="max-norm")
    with pytest.raises(ValueError, match="for data.task='generation'"):
        RunConfig(protocol="u-shaped", task="generation", defense="dchi", label_protection="randomised-response")
    with pytest.raises(ValueError, match="label-protection.noise=nan"):
        RunConfig.from_flower({"federation.protocol": "u-shaped", "label-protection.noise": float("nan")})


def test_the_device_floor_refuses_weaker_label_protection():
    u = dict(protocol="u-shaped", defense="dchi")
    policy = DevicePolicy.from_mapping({"min-label-protection": "marvell", "allowed-defenses": "*"})
    with pytest.raises(PolicyError, match="refuses label-protection.method='none': its floor is min-label-protection='marvell'"):
        policy.check(RunConfig(**u))
    with pytest.raises(PolicyError, match="refuses label-protection.method='max-norm'"):
        policy.check(RunConfig(**u, label_protection="max-norm"))
    with pytest.raises(PolicyError, match="refuses label-protection.noise=0.5 for marvell: its floor is min-label-noise=2"):
        policy.check(RunConfig(**u, label_protection="marvell", label_noise=0.5))
    policy.check(RunConfig(**u, label_protection="marvell", label_noise=4.0))
    policy.check(RunConfig(**u, label_protection="randomised-response", label_epsilon=1.0))
    with pytest.raises(PolicyError, match="refuses label-protection.epsilon=4 for randomised-response: its floor is max-label-epsilon=1"):
        policy.check(RunConfig(**u, label_protection="randomised-response", label_epsilon=4.0))
    with pytest.raises(PolicyError, match="refuses federation.protocol='vanilla'"):
        policy.check(RunConfig(defense="dchi"))
    with pytest.raises(ValueError, match="min-label-protection='some' is not accepted"):
        DevicePolicy.from_mapping({"min-label-protection": "some"})
    DevicePolicy().check(RunConfig(**u))  # the default floor accepts none


def test_a_device_with_a_floor_refuses_the_run_before_round_one(minilm_split, monkeypatch):
    """Through the real ClientApp: the device's node config sets the floor, the cloud's run config
    asks for none; the reply is an error naming the floor, before anything is released."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from privtune_flwr import client_app as device_app
    from privtune_flwr.schema import step_instruction

    cfg = RunConfig(protocol="u-shaped", defense="dchi", max_examples=200, batch_size=4, max_length=16,
                    audit_tokens=0, reproducible_noise=True)
    node = {"partition-id": 0, "num-partitions": 2, "allowed-defenses": "*", "key-store": "memory",
            "allow-reproducible-noise": True, "min-label-protection": "max-norm"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_flower())
    msg = Message(content=step_instruction(1, 0), message_type=f"{MessageType.TRAIN}.forward", dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    with pytest.raises(PolicyError, match="min-label-protection='max-norm'"):
        device_app.app(msg, context)


def test_u_shaped_device_head_returns_protected_gradients(minilm_split):
    from privtune_flwr.device import DeviceHead
    from privtune_flwr.models import load_split

    split = load_split("minilm", 1, num_labels=2, lora_rank=0, protocol="u-shaped", seed=0).without_middle()
    head = DeviceHead(split, learning_rate=1e-3)
    outputs = torch.randn(6, 5, split.hidden_size)
    mask = torch.ones(6, 5, dtype=torch.long)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    state = head.dump()
    clean, _ = head.step(outputs, mask, labels)
    head.load(state)
    head.protection = LabelProtection("marvell", noise=4.0, key=NoiseKey.from_seed(0))
    noisy, _ = head.step(outputs, mask, labels)
    assert noisy.shape == clean.shape and not torch.allclose(noisy, clean)
    assert torch.equal(noisy[:, 1:], clean[:, 1:])  # an encoder's head reads the first token only


def test_the_leakage_frontier_groups_seeds_and_takes_the_strongest_attack_per_seed(tmp_path):
    """simulations.label_leakage's frontier: one point per (method, parameter), averaged over seeds;
    the strongest attack is the largest of the three AUCs in each seed, then averaged."""
    from simulations.label_leakage import _plot, _points

    def row(seed, noise, d, n, l, acc):
        return {"defense": "none", "protection": "marvell", "label-noise": noise, "label-epsilon": None, "seed": seed,
                "direction-accuracy": 0.5, "direction-auc-shuffled-labels": 0.6, "direction-auc-known-sign": d,
                "norm-auc": n, "learned-auc": l, "learned-accuracy": 0.5, "test-accuracy": acc}

    rows = [row(0, 1.0, 0.9, 0.5, 0.7, 0.70), row(1, 1.0, 0.6, 0.5, 0.8, 0.74), row(0, 4.0, 0.52, 0.51, 0.53, 0.5)]
    points = {p["label-noise"]: p for p in _points(rows)}
    assert points[1.0]["seeds"] == 2 and points[4.0]["seeds"] == 1
    assert abs(points[1.0]["strongest-auc"] - 0.85) < 1e-12  # mean of 0.9 and 0.8, not max of the means (0.75)
    assert abs(points[1.0]["test-accuracy"] - 0.72) < 1e-12 and points[1.0]["test-accuracy-sd"] > 0
    _plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000
