"""Replies checked against what the defence can produce, and one device's influence bounded:
the public envelope (privtune_flwr.envelope) never rejects an honest release of any defence,
rejects a poisoning device's, counts it per device; per-batch clipping bounds a step."""

from __future__ import annotations

import math

import pytest
import torch

from privtune_flwr.config import RunConfig
from privtune_flwr.device import DeviceSide, device_defense
from privtune_flwr.envelope import clean_norm_bound, release_envelope, token_norms
from privtune_flwr.schema import Plan, SchemaError, parse_release, release_content

TEXTS = ["a gripping, funny and tender film", "dull , lifeless and far too long .", "the best thing this year",
         "i wanted to leave after ten minutes", "an unexpected delight from start to finish",
         "it never finds its footing", "bold and beautifully acted", "a mess of a script"] * 3
LABELS = [1, 0, 1, 0, 1, 0, 1, 0] * 3


def test_the_clean_bound_holds_for_every_token(minilm_split):
    bound = clean_norm_bound(minilm_split)
    assert math.isfinite(bound)
    rel = DeviceSide(minilm_split, device_defense("none", minilm_split, epsilon=None, texts=TEXTS, labels=LABELS),
                     max_length=32, audit_tokens=0).release(TEXTS)
    assert float(token_norms(rel.hidden, rel.attention_mask).max()) <= bound


@pytest.mark.parametrize("name,epsilon,options", [
    ("none", 64.0, {}), ("dchi", 64.0, {}), ("dchi", 1.0, {}), ("gaussian", 8.0, {}), ("privtune", 8.0, {}),
    ("label-subspace", 1.0, {"subspace_fit": "closed-form"}),
])
def test_honest_releases_of_every_defence_pass_their_envelope(minilm_split, name, epsilon, options):
    cfg = RunConfig(defense=name, epsilon=epsilon, split_layer=1, max_length=32, pgd_steps=2,
                    **{k: v for k, v in options.items() if k == "subspace_fit"})
    envelope = release_envelope(cfg, minilm_split)
    assert math.isfinite(envelope.max_token_norm), envelope
    defense = device_defense(name, minilm_split, epsilon=epsilon, texts=TEXTS, labels=LABELS, max_length=32,
                             **cfg.defense_options())
    rel = DeviceSide(minilm_split, defense, max_length=32, audit_tokens=0).release(TEXTS, LABELS)
    norms = token_norms(rel.hidden, rel.attention_mask)
    assert float(norms.max()) <= envelope.max_token_norm, (float(norms.max()), envelope)
    plan = Plan(hidden_size=minilm_split.hidden_size, num_labels=2, max_examples=len(TEXTS), max_tokens=32,
                max_token_norm=envelope.max_token_norm)
    parse_release(release_content(rel.hidden, rel.attention_mask, rel.labels, rel.metrics), plan)
    # the bound is not vacuous: a token at 1.5 x the envelope is rejected, with the bound named
    hidden = rel.hidden.clone()
    hidden[0, 0] *= 1.5 * envelope.max_token_norm / float(hidden[0, 0].norm())
    with pytest.raises(SchemaError, match="outside the defence's envelope: accepted token norm <= "):
        parse_release(release_content(hidden, rel.attention_mask, rel.labels, rel.metrics), plan)


def test_the_obfuscator_has_no_envelope_beyond_the_schema(minilm_split):
    """Documented limitation (privtune_flwr.envelope): no public bound on the obfuscator's network
    (nor on a decoder's residual stream); only the schema's max-abs applies."""
    envelope = release_envelope(RunConfig(defense="label-obfuscator", split_layer=1), minilm_split)
    assert envelope.max_token_norm == math.inf and "no public bound" in envelope.reason


def test_clipping_bounds_one_batch_step(minilm_split):
    """With max_grad_norm the gradient the optimiser steps on has at most that norm (checked where
    the optimiser reads it); without, the same batch's gradient is larger."""
    from privtune_flwr.cloud import CloudSide
    from privtune_flwr.models import load_split

    split = load_split("minilm", 1, num_labels=2, lora_rank=4, seed=0)
    cloud = CloudSide(split, learning_rate=1e-3, batch_size=4)
    hidden = torch.randn(4, 6, split.hidden_size) * 50
    mask = torch.ones(4, 6, dtype=torch.long)
    seen = []
    original = cloud.optimizer.step

    def step(*a, **k):
        seen.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in cloud.params if p.grad is not None))))
        return original(*a, **k)

    cloud.optimizer.step = step
    cloud.train_on(hidden, mask, torch.tensor([0, 1, 0, 1]), max_grad_norm=0.01)
    assert seen[0] <= 0.01 * (1 + 1e-4)
    cloud.train_on(hidden, mask, torch.tensor([1, 0, 1, 0]))
    assert seen[1] > 0.05  # unclipped, the same batch's gradient is larger


def test_a_poisoning_device_is_rejected_and_counted_and_flips_are_not_detected(minilm_split):
    """One of five devices (20%) sends every value at 9.9e5 (under max-abs) with flipped labels:
    each of its training replies is rejected by the envelope and counted against it, and the run
    ends exactly where the run without its replies ends. A device that flips labels on honest
    releases is accepted (not detectable: label noise, bounded by clipping)."""
    from simulations.faults import FaultPlan, faulty_app
    from test_strategy import Grid, _cfg, _vanilla

    common = dict(devices_per_round=5, min_devices=5, num_rounds=2, max_grad_norm=1.0)
    cfg = _cfg(**common)
    poisoned = _vanilla(cfg)
    poisoned.start(Grid(cfg, 5, faulty_app(FaultPlan(fraction=0.2, kinds=("poison",)))))
    train = [e for e in poisoned.rejected.entries if e["phase"] == "train"]
    assert len(train) == 2 and {e["device"] for e in train} == {"device 0"}
    assert all("outside the defence's envelope" in e["cause"] for e in train)

    reference = _vanilla(_cfg(**common))
    grid = Grid(cfg, 5)
    deliver = grid.send_and_receive

    def without_poisoner(messages, *, timeout=None):
        replies = deliver(messages, timeout=timeout)
        return [r for r in replies if not (r.metadata.src_node_id == 1 and r.metadata.message_type == "train")]

    grid.send_and_receive = without_poisoner
    reference.start(grid)
    mine, theirs = poisoned.cloud.split.trainable_state(), reference.cloud.split.trainable_state()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    flipped = _vanilla(_cfg(**common))
    flipped.start(Grid(cfg, 5, faulty_app(FaultPlan(fraction=0.2, kinds=("flip",)))))
    assert not [e for e in flipped.rejected.entries if e["phase"] == "train"]  # plausible: accepted
