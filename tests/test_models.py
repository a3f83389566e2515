"""Split models: frozen bottom, LoRA top, and split == unsplit without noise."""

import copy
import logging

import pytest
import torch

from privtune_flwr.models import load_split, position_ids
from tests.conftest import tiny_hf_model


def _batch(vocab_low=1000, vocab_high=2000, lengths=(9, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(vocab_low, vocab_high, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def _left_pad(ids, mask):
    # decoders pad on the left: move each row's real tokens to the end
    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i in range(len(ids)):
        n = int(mask[i].sum())
        out_ids[i, -n:] = ids[i, :n]
        out_mask[i, -n:] = 1
    return out_ids, out_mask


CASES = [("encoder", "classification"), ("decoder", "classification"), ("decoder", "generation")]


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("where", ["zero", "one", "last"])
def test_split_reproduces_unsplit_logits(family, task, where, minilm_tokenizer):
    layers = 3
    m = {"zero": 0, "one": 1, "last": layers - 1}[where]
    hf = tiny_hf_model(family, task, layers=layers)
    reference = copy.deepcopy(hf)  # untouched by the graft and by LoRA
    protocol = "u-shaped" if task == "generation" else "vanilla"  # generation is u-shaped only
    split = load_split("tiny", m, task, 2, hf_model=hf, tokenizer=copy.deepcopy(minilm_tokenizer), protocol=protocol)
    ids, mask = _batch()
    if family == "decoder":
        ids, mask = _left_pad(ids, mask)
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    with torch.no_grad():
        extra = {"position_ids": position_ids(mask)} if family == "decoder" else {}
        want = reference(input_ids=ids, attention_mask=mask, **extra).logits
        split.top.eval()
        got = split.top(split.bottom(ids, mask), mask)
    if task == "generation":  # compare at real positions
        want, got = want[mask.bool()], got[mask.bool()]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_split_at_every_layer_including_L(minilm_tokenizer):
    hf = tiny_hf_model("encoder", layers=2)
    reference = copy.deepcopy(hf)
    ids, mask = _batch()
    want = reference(input_ids=ids, attention_mask=mask).logits
    for m in range(0, 3):
        split = load_split("tiny", m, hf_model=copy.deepcopy(hf), tokenizer=minilm_tokenizer)
        with torch.no_grad():
            split.top.eval()
            got = split.top(split.bottom(ids, mask), mask)
        assert torch.allclose(got, want, atol=1e-4), m


def test_real_minilm_split_matches_unsplit(minilm_split):
    split = minilm_split
    enc = split.tokenize(["a gripping, beautifully shot film", "dull and far too long", "ok"], 32)
    with torch.no_grad():
        split.top.eval()
        got = split.top(split.bottom(**enc), enc["attention_mask"])
        want = split.full(**enc).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert split.hidden_size == 384 and split.num_layers == 6 and split.vocab_size == 30522


def test_bottom_frozen_top_has_lora_and_head(minilm_split):
    split = minilm_split
    assert not any(p.requires_grad for p in split.bottom.parameters())
    trainable = [n for n, p in split.top.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    # LoRA only above the split: the top holds 6 - 1 = 5 blocks, each with query and value adapters
    assert sum("lora_A" in n for n in trainable) == 5 * 2
    split.bottom.train()
    assert not split.bottom.training  # dropout never switches on below the split
    enc = split.tokenize(["hello world"], 16)
    assert not split.bottom(**enc).requires_grad


def test_lora_training_changes_top_only(minilm_tokenizer):
    split = load_split("tiny", 1, hf_model=tiny_hf_model("encoder"), tokenizer=minilm_tokenizer)
    ids, mask = _batch()
    before_bottom = [p.clone() for p in split.bottom.parameters()]
    before_top = split.trainable_state()
    opt = torch.optim.AdamW([p for p in split.top.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(split.top(split.bottom(ids, mask), mask), torch.tensor([0, 1, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_bottom, split.bottom.parameters()))
    after = split.trainable_state()
    assert any(not torch.equal(before_top[k], after[k]) for k in after)


@pytest.mark.parametrize("bad", [-1, 4, 1.5, "2"])
def test_split_layer_out_of_range(bad, minilm_tokenizer):
    with pytest.raises(ValueError, match=r"split_layer=.*outside 0\.\.3"):
        load_split("tiny", bad, hf_model=tiny_hf_model("encoder"), tokenizer=minilm_tokenizer)


def test_bad_model_and_task_names(minilm_tokenizer):
    with pytest.raises(ValueError, match="no-such-model"):
        load_split("no-such-model", 1)
    with pytest.raises(ValueError, match="task='translate'"):
        load_split("minilm", 1, task="translate")
    with pytest.raises(ValueError, match="needs a decoder"):
        load_split("tiny", 1, "generation", hf_model=tiny_hf_model("encoder"), tokenizer=minilm_tokenizer,
                   protocol="u-shaped")


def test_real_smollm2_from_gguf_split_matches_unsplit():
    """The offline SmolLM2 (GGUF, dequantised once into the cache) splits exactly too."""
    split = load_split("smollm2", 2, "generation", protocol="u-shaped")
    assert (split.family, split.num_layers, split.hidden_size, split.vocab_size) == ("decoder", 30, 576, 49152)
    enc = split.tokenize(["The capital of France is", "Hello"], 16)
    with torch.no_grad():
        split.top.eval()
        got = split.top(split.bottom(**enc), enc["attention_mask"])
        want = split.full(**enc, position_ids=position_ids(enc["attention_mask"])).logits
    real = enc["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-4)
    assert split.tokenizer.decode(got[0, -1].argmax()).strip() == "Paris"


def test_loading_our_models_is_quiet_and_restores_transformers_settings(capfd, caplog):
    """The fresh task head is expected: no load report, no progress bar, no deprecation warning."""
    import warnings

    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_split("minilm", split_layer=1, task="classification", num_labels=2)
        load_split("minilm", split_layer=1, task="classification", num_labels=2, protocol="u-shaped")  # LoRA'd middle
    out = capfd.readouterr()
    for noise in ("LOAD REPORT", "MISSING", "Loading weights"):
        assert noise not in out.out + out.err
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_unexpected_checkpoint_keys_are_still_reported(caplog):
    from privtune_flwr.models import _report_unexpected_loading

    with caplog.at_level(logging.WARNING):
        _report_unexpected_loading("m", {"missing_keys": ["classifier.weight", "classifier.bias"], "unexpected_keys": ["pooler.dense.bias"]})
        assert caplog.records == []  # the fresh head and an unused pooler are expected
        _report_unexpected_loading("m", {"missing_keys": ["classifier.weight", "encoder.layer.0.attention.self.query.weight"]})
    assert [r.getMessage() for r in caplog.records] == [
        "model 'm': 1 missing keys when loading, e.g. ['encoder.layer.0.attention.self.query.weight']"]


@pytest.mark.parametrize("protocol", ["vanilla", "u-shaped"])
def test_lora_on_all_linear_layers_trains_the_pooler_and_keeps_the_bottom_frozen(protocol, minilm_tokenizer):
    hf = tiny_hf_model("encoder")
    split = load_split("tiny", 1, hf_model=hf, tokenizer=minilm_tokenizer, lora_targets="all", protocol=protocol)
    cloud = split.top if protocol == "vanilla" else split.middle
    adapted = [n for n, p in cloud.named_parameters() if p.requires_grad and "lora_A" in n]
    # 2 blocks above the split, each with query, key, value, attention output, intermediate and output
    assert len(adapted) == 2 * 6
    assert not any("pooler" in n for n in adapted)  # the pooler trains whole, not through LoRA
    pooler_owner = split.top if protocol == "vanilla" else split.head
    pooler = [p for n, p in pooler_owner.named_parameters() if "pooler" in n and p.requires_grad]
    assert len(pooler) == 2  # weight and bias
    assert not any(p.requires_grad for p in split.bottom.parameters())
    # LoRA starts at zero: the split still computes what the unsplit model computes
    ids, mask = _batch()
    want = hf(input_ids=ids, attention_mask=mask).logits
    hidden = split.bottom(ids, mask)
    got = split.top(hidden, mask) if protocol == "vanilla" else split.head(split.middle(hidden, mask), mask)
    assert torch.allclose(got, want, atol=1e-5)


def test_lora_on_all_linear_layers_of_a_decoder(minilm_tokenizer):
    # a copy: a decoder's split pads its tokenizer on the left, which must not leak into the shared fixture
    split = load_split("tiny", 1, hf_model=tiny_hf_model("decoder"), tokenizer=copy.deepcopy(minilm_tokenizer),
                       lora_targets="all")
    adapted = [n for n, p in split.top.named_parameters() if p.requires_grad and "lora_A" in n]
    assert len(adapted) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks above the split


def test_unknown_lora_targets_are_refused(minilm_tokenizer):
    with pytest.raises(ValueError, match=r"lora_targets='mlp'.*accepted: attention, all"):
        load_split("tiny", 1, hf_model=tiny_hf_model("encoder"), tokenizer=minilm_tokenizer, lora_targets="mlp")
