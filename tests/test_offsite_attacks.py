"""The attacks on offsite tuning's adapter updates (privtune_flwr/attacks/updates.py)."""

from __future__ import annotations

import torch

from privtune_flwr import offsite
from privtune_flwr.attacks import updates as oa
from tests.test_offsite import one_thread  # noqa: F401 - the same autouse fixture: one thread for small models

TEXTS = ["a quiet film about grief", "the plot is thin but fun", "an overlong mess", "warm , funny and wise"] * 8




def _offsite(minilm_tokenizer, rank):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     num_labels=2, max_position_embeddings=64, hidden_dropout_prob=0.1)
    model = BertForSequenceClassification(cfg).eval()
    return offsite.build_offsite("tiny", method="fedbiot", emulator_drop=0.5, distill_steps=0, lora_rank=rank,
                                 max_length=24, aux_texts=TEXTS, hf_model=model, tokenizer=minilm_tokenizer)


def test_trimmed_residual_sets_dropped_coordinates_aside():
    g = torch.Generator().manual_seed(0)
    span = torch.linalg.qr(torch.randn(96, 12, generator=g, dtype=torch.float64)).Q
    inside = (span @ torch.randn(12, 5, generator=g, dtype=torch.float64)).T.float()
    outside = torch.randn(5, 96, generator=g)
    keep = (torch.rand(inside.shape, generator=g) > 0.1).float()
    # the device sends the span of the dropped-out inputs; the attacker holds the clean candidates
    dropped_span = oa.row_space(inside * keep / 0.9)
    assert dropped_span.shape[1] == 5
    present = oa.trimmed_residuals(dropped_span, inside, 0.1)
    absent = oa.trimmed_residuals(dropped_span, outside, 0.1)
    assert float(present.max()) < 0.01 and float(absent.min()) > 0.5, (present, absent)
    # without trimming, dropout leaves a present input several percent outside the span
    assert float(oa.trimmed_residuals(dropped_span, inside, 0.0).min()) > 0.02 > 2 * float(present.max())


def test_active_cloud_recovers_a_sentence_from_one_update_and_the_device_accepts_its_adapters(minilm_tokenizer):
    off = _offsite(minilm_tokenizer, rank=32)
    special = set(off.tokenizer.all_special_ids)
    sentence = ["the actors are warm and the plot is thin"]
    ids, mask = offsite._encode(off, sentence, 24)
    truth = oa.real_pairs(ids, mask, special)
    vocab = torch.tensor(sorted({t for t, _ in truth} | set(range(1000, 3000))))
    sent = oa.active_adapters(off, off.adapter_state(emulator=True), seed=1)
    offsite.check_adapters(sent, off.adapter_spec())  # the device's own check passes them
    returned = oa.device_update(off, sent, [(ids, mask, torch.tensor([1]))], learning_rate=1e-3, seed=0)
    guess, rank = oa.attack_update(off, sent, returned, n=len(truth), positions=int(ids.shape[1]), candidates=vocab)
    assert rank >= len(truth)  # every real token's input (and [CLS], [SEP]) is in the span
    assert len(guess & truth) / len(truth) >= 0.9
    # a blind guess of the same size from 2,000 candidates at these positions finds almost none
    g = torch.Generator().manual_seed(0)
    blind = {(int(vocab[i]), int(p)) for i, p in zip(torch.randint(len(vocab), (len(truth),), generator=g),
                                                       torch.randint(int(ids.shape[1]), (len(truth),), generator=g))}
    assert len(blind & truth) <= 1
    # the head's bias rose for the sentence's label
    bias = oa.head_bias_key(off)
    assert int((returned[bias] - sent[bias]).argmax()) == 1


def test_the_span_check_needs_the_update_not_just_the_sentence(minilm_tokenizer):
    """The same attack on an update of another sentence recovers almost nothing of this one."""
    off = _offsite(minilm_tokenizer, rank=32)
    special = set(off.tokenizer.all_special_ids)
    ids, mask = offsite._encode(off, ["the actors are warm and the plot is thin"], 24)
    other_ids, other_mask = offsite._encode(off, ["dull , dull , dull beyond belief for an hour"], 24)
    truth = oa.real_pairs(ids, mask, special)
    other = oa.real_pairs(other_ids, other_mask, special)
    vocab = torch.tensor(sorted({t for t, _ in truth | other} | set(range(1000, 3000))))
    sent = oa.active_adapters(off, off.adapter_state(emulator=True), seed=1)
    returned = oa.device_update(off, sent, [(other_ids, other_mask, torch.tensor([0]))], learning_rate=1e-3, seed=0)
    guess, _ = oa.attack_update(off, sent, returned, n=len(truth), positions=int(ids.shape[1]), candidates=vocab)
    shared = truth & other
    assert len((guess & truth) - shared) <= 1


def test_the_span_attack_refuses_a_decoder_rather_than_scoring_positions_it_cannot_see(minilm_tokenizer):
    import copy

    import pytest

    from tests.conftest import tiny_hf_model

    off = offsite.build_offsite("tiny", task="generation", method="fedbiot", emulator_drop=0.5, distill_steps=0,
                                lora_rank=4, max_length=24, aux_texts=TEXTS, hf_model=tiny_hf_model("decoder", "generation", layers=4),
                                tokenizer=copy.deepcopy(minilm_tokenizer))
    state = off.adapter_state(emulator=True)
    with pytest.raises(ValueError, match="scores \\(token, position\\) pairs of an encoder; got a decoder"):
        oa.attack_update(off, state, state, n=3, positions=4, candidates=torch.arange(100))


def _decoder(minilm_tokenizer, rank):
    import copy

    from tests.conftest import tiny_hf_model

    torch.manual_seed(0)
    return offsite.build_offsite("tiny", task="generation", method="fedbiot", emulator_drop=0.5, distill_steps=0,
                                 lora_rank=rank, max_length=24, aux_texts=TEXTS,
                                 hf_model=tiny_hf_model("decoder", "generation", layers=4),
                                 tokenizer=copy.deepcopy(minilm_tokenizer))


def test_active_cloud_recovers_a_decoder_batchs_tokens_and_only_from_its_own_update(minilm_tokenizer):
    off = _decoder(minilm_tokenizer, rank=16)
    special = set(off.tokenizer.all_special_ids)
    ids, mask = offsite._encode(off, ["the actors are warm and the plot is thin"], 24)
    other_ids, other_mask = offsite._encode(off, ["dull , dull , dull beyond belief for an hour"], 24)
    truth, other = oa.real_tokens(ids, mask, special), oa.real_tokens(other_ids, other_mask, special)
    vocab = torch.tensor(sorted(truth | other | set(range(1000, 3000))))
    sent = oa.active_adapters(off, off.adapter_state(emulator=True), seed=1)
    offsite.check_adapters(sent, off.adapter_spec())
    returned = oa.device_update(off, sent, [(ids, mask, None)], learning_rate=1e-3, seed=0)
    guess, rank = oa.attack_tokens(off, sent, returned, n=len(truth), candidates=vocab)
    # every token that some later position attends to is in the span (the last one only feeds its own position)
    assert rank >= len(truth) - 1
    assert len(guess & truth) >= len(truth) - 1
    # the same attack on an update of another batch names none of this batch's own tokens
    returned = oa.device_update(off, sent, [(other_ids, other_mask, None)], learning_rate=1e-3, seed=0)
    guess, _ = oa.attack_tokens(off, sent, returned, n=len(truth), candidates=vocab)
    assert len((guess & truth) - other) <= 1
    # an encoder's update goes to the (token, position) attack instead
    enc = _offsite(minilm_tokenizer, rank=4)
    state = enc.adapter_state(emulator=True)
    import pytest

    with pytest.raises(ValueError, match="scores a decoder's tokens; got family='encoder'"):
        oa.attack_tokens(enc, state, state, n=3, candidates=torch.arange(100))


def test_offsite_utility_refuses_bad_arguments_by_name(tmp_path):
    import pytest

    from simulations import offsite_utility

    for argv, named in ((["--methods", "fedavg"], "fedavg"), (["--dataset", "nope"], "nope"),
                        (["--max-steps", "0"], "--max-steps 0")):
        with pytest.raises(SystemExit, match=named):
            offsite_utility.main(["--out", str(tmp_path), *argv])
    assert not (tmp_path / "results.json").exists()
