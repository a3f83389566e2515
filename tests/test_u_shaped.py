"""The u-shaped split: labels and the loss stay on the device, and one step equals centralised LoRA."""

from __future__ import annotations

import copy
import gc
import math
import re

import pytest
import torch

from privtune_flwr.cloud import MiddleSide
from privtune_flwr.tasks import task_loss
from privtune_flwr.device import DeviceHead
from privtune_flwr.models import load_split, position_ids
from tests.conftest import tiny_hf_model

CASES = [("encoder", "classification"), ("decoder", "classification"), ("decoder", "generation")]


def _split(family, task, minilm_tokenizer, seed=0):
    hf = tiny_hf_model(family, task, layers=3, seed=seed)
    for module in hf.modules():  # no dropout: the two runs must see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(seed)  # the LoRA initialisation
    return load_split("tiny", 1, task, 2, hf_model=hf, tokenizer=copy.deepcopy(minilm_tokenizer), lora_rank=4,
                      protocol="u-shaped")


def _batch(split):
    enc = split.tokenize(["a wonderful, moving film", "dull", "the plot is thin but the actors shine"], 16)
    targets = torch.tensor([1, 0, 1]) if split.task == "classification" else enc["input_ids"]
    return enc["input_ids"], enc["attention_mask"], targets


@pytest.mark.parametrize("family,task", CASES)
def test_u_shaped_composes_to_the_unsplit_model(family, task, minilm_tokenizer):
    hf = tiny_hf_model(family, task, layers=3)
    reference = copy.deepcopy(hf)
    split = load_split("tiny", 1, task, 2, hf_model=hf, tokenizer=copy.deepcopy(minilm_tokenizer), protocol="u-shaped")
    ids, mask, _ = _batch(split)
    with torch.no_grad():
        split.top.eval()
        got = split.head(split.middle(split.bottom(ids, mask), mask), mask)
        extra = {"position_ids": position_ids(mask)} if family == "decoder" else {}
        want = reference(input_ids=ids, attention_mask=mask, **extra).logits
    if task == "generation":
        got, want = got[mask.bool()], want[mask.bool()]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("family,task", CASES)
def test_one_u_shaped_step_equals_centralised_lora_training(family, task, minilm_tokenizer):
    """Same LoRA and head updates, within 1e-5 in float32, as one joint AdamW step on the model."""
    central = _split(family, task, minilm_tokenizer)
    split = copy.deepcopy(central)
    ids, mask, targets = _batch(split)
    lr = 1e-2

    # centralised: one optimiser over every trainable weight, one backward through head(middle(.))
    params = [p for p in central.middle.parameters() if p.requires_grad] + \
             [p for p in central.head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    hidden = central.bottom(ids, mask)
    loss = task_loss(central.head(central.middle(hidden, mask), mask), mask, targets, task)
    loss.backward()
    opt.step()

    # u-shaped: the cloud forwards, the device computes the loss and sends back only a gradient
    cloud, device = MiddleSide(split, learning_rate=lr), DeviceHead(split, learning_rate=lr)
    released = split.bottom(ids, mask)
    outputs = cloud.forward("step-1", released, mask)
    grad, device_loss = device.step(outputs, mask, targets)
    cloud.backward("step-1", grad)
    assert cloud.step()
    assert device_loss == pytest.approx(float(loss.detach()), abs=1e-6)

    before = _split(family, task, minilm_tokenizer)
    for part in ("middle", "head"):
        mine = {k: v for k, v in getattr(split, part).named_parameters() if v.requires_grad}
        theirs = {k: v for k, v in getattr(central, part).named_parameters() if v.requires_grad}
        start = {k: v for k, v in getattr(before, part).named_parameters() if v.requires_grad}
        assert mine.keys() == theirs.keys() and mine
        moved = 0
        for k in mine:
            assert torch.allclose(mine[k], theirs[k], atol=1e-5, rtol=0), (part, k, (mine[k] - theirs[k]).abs().max())
            moved += not torch.equal(mine[k], start[k])
        assert moved > 0, part  # the step really updated this part


def test_per_batch_gradients_step_like_one_joint_step_and_check_the_same(minilm_tokenizer):
    """`gradients` + `apply` (one optimiser step per device batch) is `backward` + `step` for one
    batch, and refuses what `backward` refuses."""
    joint = _split("encoder", "classification", minilm_tokenizer)
    apart = copy.deepcopy(joint)
    ids, mask, _ = _batch(joint)
    grad = torch.randn(ids.shape[0], ids.shape[1], joint.hidden_size, generator=torch.Generator().manual_seed(3))
    a, b = MiddleSide(joint, learning_rate=1e-2), MiddleSide(apart, learning_rate=1e-2)
    a.forward("s", joint.bottom(ids, mask), mask)
    a.backward("s", grad)
    assert a.step()
    b.forward("s", apart.bottom(ids, mask), mask)
    assert b.apply(b.gradients("s", grad)) and b.steps == 1 and not b.pending
    for k, v in joint.trainable_state().items():
        assert torch.allclose(v, apart.trainable_state()[k], atol=1e-6, rtol=0), k
    with pytest.raises(KeyError, match="stale or unknown"):
        b.gradients("s", grad)
    b.forward("t", apart.bottom(ids, mask), mask)
    with pytest.raises(ValueError, match="non-finite"):
        b.gradients("t", torch.full_like(grad, float("inf")))
    assert not b.pending
    before = {k: v.clone() for k, v in apart.trainable_state().items()}
    nan = [None if g is None else torch.full_like(g, float("nan")) for g in b.params]
    assert not b.apply(nan) and b.steps == 1
    assert all(torch.equal(before[k], v) for k, v in apart.trainable_state().items())


def test_middle_drops_bad_and_stale_gradients_without_leaking_graphs(minilm_tokenizer):
    split = _split("encoder", "classification", minilm_tokenizer)
    cloud = MiddleSide(split, learning_rate=1e-3)
    ids, mask, _ = _batch(split)
    hidden = split.bottom(ids, mask)
    before = {k: v.clone() for k, v in split.trainable_state().items()}
    with pytest.raises(KeyError, match="stale or unknown"):
        cloud.backward("never-sent", torch.zeros(3, ids.shape[1], split.hidden_size))
    out = cloud.forward("s1", hidden, mask)
    with pytest.raises(ValueError, match="the outputs sent were"):
        cloud.backward("s1", torch.zeros(2, *out.shape[1:]))
    cloud.forward("s2", hidden, mask)
    with pytest.raises(ValueError, match="non-finite"):
        cloud.backward("s2", torch.full(out.shape, float("nan")))
    assert not cloud.step()  # nothing accumulated: no update
    assert all(torch.equal(before[k], v) for k, v in split.trainable_state().items())
    # a device that never answers: its graph is dropped; memory stays flat over 100 such steps
    from tests.test_fuzz import _rss_mb

    for i in range(10):
        cloud.forward(f"warm-{i}", hidden, mask)
        cloud.drop(f"warm-{i}")
    gc.collect()
    start = _rss_mb()
    for i in range(100):
        cloud.forward(f"lost-{i}", hidden, mask)
        cloud.drop(f"lost-{i}")
    gc.collect()
    assert not cloud.pending and _rss_mb() - start < 20


def test_generation_with_the_vanilla_protocol_is_refused(minilm_tokenizer):
    with pytest.raises(ValueError, match="needs protocol='u-shaped'"):
        load_split("tiny", 1, "generation", hf_model=tiny_hf_model("decoder", "generation"),
                   tokenizer=minilm_tokenizer)
    with pytest.raises(ValueError, match="protocol='sideways'.*vanilla, u-shaped"):
        load_split("tiny", 1, protocol="sideways", hf_model=tiny_hf_model("encoder"), tokenizer=minilm_tokenizer)


def test_returned_gradients_reveal_labels_to_the_cloud(minilm_tokenizer):
    """The gradient the device returns is a release too: the direction attack reads the labels."""
    from privtune_flwr.attacks.gradient import label_inference

    split = _split("encoder", "classification", minilm_tokenizer)
    cloud, device = MiddleSide(split, learning_rate=1e-3), DeviceHead(split, learning_rate=1e-3)
    texts = [f"review number {i} {'great fun' if i % 2 else 'dull mess'} with words" for i in range(48)]
    labels = torch.tensor([i % 2 for i in range(48)])
    gen = torch.Generator().manual_seed(0)
    steps = []
    for start in range(0, 48, 12):
        order = torch.randperm(12, generator=gen) + start
        enc = split.tokenize([texts[i] for i in order], 16)
        out = cloud.forward(f"s{start}", split.bottom(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
        grad, _ = device.step(out, enc["attention_mask"], labels[order])
        cloud.backward(f"s{start}", grad)
        cloud.step()
        steps.append((grad, labels[order]))
    result = label_inference(steps)
    assert result["accuracy"] > 0.9 and result["auc"] > 0.9  # the labels leak through the gradient
    # random gradients carry no label: the attack falls to about chance
    noise = [(torch.randn(g.shape, generator=gen), y) for g, y in steps]
    assert label_inference(noise)["auc"] < 0.85


# -- generation in one process (the sweep's generation points) ---------------------------------------


def _generation_device(split, max_length=32):
    from privtune_flwr.device import DeviceSide, device_defense

    defense = device_defense("none", split, epsilon=None, texts=["a film"], labels=None, task="generation",
                             max_length=max_length)
    return DeviceSide(split, defense, max_length=max_length, audit_tokens=0)


def test_u_shaped_greedy_generation_equals_the_unsplit_models_greedy_decoding(minilm_tokenizer):
    """With no noise, the device/cloud loop (release the sequence so far, the middle forwards it,
    the head picks the next token) continues each prompt exactly as `generate` on the whole model,
    whatever the other prompts in its batch pad it to."""
    from simulations.training import u_shaped_generate

    hf = tiny_hf_model("decoder", "generation", layers=3, seed=1)
    reference = copy.deepcopy(hf)
    split = load_split("tiny", 1, "generation", hf_model=hf, tokenizer=copy.deepcopy(minilm_tokenizer), protocol="u-shaped")
    device = _generation_device(split)
    prompts = [minilm_tokenizer(t)["input_ids"] for t in ("a wonderful, moving film", "dull", "the plot is thin but")]
    got = u_shaped_generate(device, MiddleSide(split, learning_rate=1e-3), DeviceHead(split, learning_rate=1e-3), prompts, 6)
    for prompt, seq in zip(prompts, got):
        want = reference.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
        assert seq == want
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        u_shaped_generate(device, MiddleSide(split, learning_rate=1e-3), DeviceHead(split, learning_rate=1e-3), prompts, 0)


def test_u_shaped_fine_tuning_to_convergence_lowers_validation_perplexity_and_keeps_the_best(minilm_tokenizer):
    from simulations.training import ReleasedSet, StopRule, fine_tune_u_shaped_to_convergence, u_shaped_perplexity

    split = _split("decoder", "generation", minilm_tokenizer)
    device = _generation_device(split)
    middle, head = MiddleSide(split, learning_rate=1e-2), DeviceHead(split, learning_rate=1e-2)
    texts = ["the film is good and the actors are good"] * 12 + ["the plot is thin and the film is long"] * 12
    validation = ["the film is good and the plot is thin", "the actors are good and the film is long"]
    before = u_shaped_perplexity(middle, head, ReleasedSet(device, validation))
    run = fine_tune_u_shaped_to_convergence(device, middle, head, texts, validation, StopRule(patience=2, eval_every=3, max_steps=30),
                                            batch_size=4, seed=0)
    after = u_shaped_perplexity(middle, head, ReleasedSet(device, validation))
    assert run["steps"] <= 30 and run["best_step"] >= 3 and len(run["history"]) >= 1
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)
    # both halves end at the best weights: the reported best is what they score now
    assert after["perplexity"] == pytest.approx(run["best_validation"], rel=1e-5)
    assert min(v for _, v, _ in run["history"]) == pytest.approx(run["best_validation"])


# -- the device bounds what the cloud sends -----------------------------------------------------------


def _head_state(head: DeviceHead) -> dict:
    return {"weights": {k: v.detach().clone() for k, v in head.named.items()},
            "optimizer": {k: v.clone() for k, v in head.dump()["optimizer"].items()}, "steps": head.steps}


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("value", [1e38, 3.4e38, -2e6, float("nan"), float("inf")])
def test_the_head_refuses_outputs_outside_its_public_range_and_stays_untouched(family, task, value, minilm_tokenizer):
    """1e38 once reached the head and left it finite only because the gradient happened to be 0:
    now outputs beyond the head's public range (finite, and |value| within the encoder middle's
    LayerNorm bound, or 1e6 for a decoder's residual stream) are refused, by value and range,
    before the head, its optimiser or its step count changes; honest outputs still train."""
    split = _split(family, task, minilm_tokenizer)
    cloud, head = MiddleSide(split, learning_rate=1e-2), DeviceHead(split, learning_rate=1e-2)
    if family == "encoder":
        assert split.middle_output_bound is not None and head.max_abs == split.middle_output_bound < 1e3
    else:
        assert split.middle_output_bound is None and head.max_abs == 1e6
    limit = re.escape(f"{head.max_abs:g}")
    ids, mask, targets = _batch(split)
    honest = cloud.forward("s", split.bottom(ids, mask), mask)
    head.step(honest, mask, targets)  # the optimiser has state to protect
    before = _head_state(head)
    hostile = honest.clone()
    hostile[0, 0, 0] = value
    shown = "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{abs(value):.4g}")
    for call in (head.step, head.evaluate):
        with pytest.raises(ValueError, match=r"the cloud's outputs hold .*" + re.escape(shown) + r".*accepted: finite values "
                                             r"with \|value\| <= " + limit + r" \(the head's public input range, d=32\)"):
            call(hostile, mask, targets)
    after = _head_state(head)
    assert after["steps"] == before["steps"]
    assert all(torch.equal(before["weights"][k], v) for k, v in after["weights"].items())
    assert before["optimizer"].keys() == after["optimizer"].keys()
    assert all(torch.equal(before["optimizer"][k], v) for k, v in after["optimizer"].items())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.params)
    grad, loss = head.step(honest, mask, targets)  # and it still trains on what is in range
    assert torch.isfinite(grad).all() and math.isfinite(loss) and head.steps == before["steps"] + 1
    # honest middles lie inside the range: an encoder's is exact (tight), a decoder's cap far above
    assert float(honest.abs().max()) < head.max_abs / (1 if family == "encoder" else 100)


def test_an_encoder_middles_output_bound_holds_for_any_input_and_is_nearly_attained(minilm_tokenizer):
    """The encoder head's range is the middle's last LayerNorm's ``max |gamma| sqrt(d-1) + |beta|``:
    (1) gradient ascent on the middle's input (the cloud's most favourable honest-looking input,
    any scale) never pushes an output coordinate past it; (2) the LayerNorm alone reaches within
    2% of it with one spiked coordinate, so the bound is tight, not a loose guess; (3) an honest
    middle's outputs on real sentences sit inside it, and 1.5 x the bound is refused."""
    split = _split("encoder", "classification", minilm_tokenizer)
    bound = split.middle_output_bound
    ln = [m for m in split.middle.modules() if isinstance(m, torch.nn.LayerNorm)][-1]  # the last block's output norm
    d = split.hidden_size
    gamma, beta = ln.weight.detach(), ln.bias.detach()
    i = int((gamma.abs() * math.sqrt(d - 1) + beta.abs()).argmax())
    spike = torch.zeros(1, 1, d)
    spike[0, 0, i] = 1e4 if float(gamma[i] * beta[i]) >= 0 else -1e4  # the sign where beta adds to gamma's term
    reached = float(ln(spike).abs().max())
    assert bound / 1.02 <= reached <= bound
    mask = torch.ones(2, 6, dtype=torch.long)
    worst = 0.0
    for scale in (1e-2, 1.0, 1e4):
        x = (torch.randn(2, 6, d, generator=torch.Generator().manual_seed(int(scale * 100))) * scale).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.1 * scale)
        for _ in range(40):
            out = split.middle(x, mask)
            worst = max(worst, float(out.detach().abs().max()))
            opt.zero_grad()
            (-out.abs().max()).backward()
            opt.step()
    assert worst <= bound
    ids, m, targets = _batch(split)
    honest = split.middle(split.bottom(ids, m), m)
    head = DeviceHead(split, learning_rate=1e-2)
    head.check_outputs(honest.detach())
    with pytest.raises(ValueError, match="accepted: finite values"):
        head.check_outputs(torch.full_like(honest, 1.5 * bound))


def test_one_device_adds_at_most_its_weight_times_max_grad_norm_to_a_middle_step(minilm_tokenizer):
    """u-shaped clipping: the gradient a device returns is turned into its LoRA gradient and
    clipped to ``max_norm`` before it joins the step. A device that returns its gradient times 1e6
    moves the accumulated step by at most ``weight * max_norm`` from the honest-only step (without
    clipping: by hundreds of times more); clipping with a bound no gradient reaches changes nothing."""
    split = _split("encoder", "classification", minilm_tokenizer)
    cloud, head = MiddleSide(split, learning_rate=1e-2), DeviceHead(split, learning_rate=1e-2)
    ids, mask, targets = _batch(split)
    hidden = split.bottom(ids, mask)

    def accumulated(scale_hostile: float, max_norm):
        for p in cloud.params:
            p.grad = None
        for key, scale in (("honest", 1.0), ("hostile", scale_hostile)):
            out = cloud.forward(key, hidden, mask)
            grad, _ = DeviceHead(split, learning_rate=0.0).step(out, mask, targets)
            cloud.backward(key, grad * scale, weight=3.0, max_norm=max_norm)
        return torch.cat([p.grad.flatten() for p in cloud.params if p.grad is not None])

    def honest_only(max_norm):
        for p in cloud.params:
            p.grad = None
        out = cloud.forward("honest", hidden, mask)
        grad, _ = DeviceHead(split, learning_rate=0.0).step(out, mask, targets)
        cloud.backward("honest", grad, weight=3.0, max_norm=max_norm)
        return torch.cat([p.grad.flatten() for p in cloud.params if p.grad is not None])

    del head
    base = honest_only(1.0)
    clipped = accumulated(1e6, 1.0)
    assert float((clipped - base).norm()) <= 3.0 * 1.0 * (1 + 1e-5)
    unclipped = accumulated(1e6, None)
    assert float((unclipped - honest_only(None)).norm()) > 100 * float((clipped - base).norm())
    assert torch.allclose(accumulated(1.0, 1e9), accumulated(1.0, None), rtol=1e-5, atol=1e-8)
    for p in cloud.params:
        p.grad = None
