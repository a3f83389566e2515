"""Every supported family splits exactly, for any padding side, and keeps its own head.

Tiny random models built from transformers' own configs (hidden 32, 3 blocks, cut after block 1),
seeded. The reference is the unsplit model run on each example *alone* (no padding), so a split
that reads a pad, or counts positions from a batch's padding, shows up as a difference. Run
``python -m tests.test_families`` for the table of maximum differences.
"""

from __future__ import annotations

import copy

import pytest
import torch

from privtune_flwr.models import FAMILIES, load_split

ARCHS = ["bert", "roberta", "xlm-roberta", "llama", "mistral", "qwen2"]
DECODERS = ["llama", "mistral", "qwen2"]
# (protocol, task): classification both ways; generation is u-shaped only, decoders only
SETTINGS = [("vanilla", "classification"), ("u-shaped", "classification"), ("u-shaped", "generation")]
CASES = [(a, p, t) for a in ARCHS for p, t in SETTINGS if t == "classification" or a in DECODERS]
LENGTHS = (9, 5, 7, 1)  # Mistral's window is 4: the longer rows reach past it
TOL = 1e-5

# Special tokens as each family's own tokenizer spells them; Llama-3's has no pad token.
SPECIALS = {
    "bert": dict(tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], bos="[CLS]", eos="[SEP]", pad="[PAD]", unk="[UNK]"),
    "roberta": dict(tokens=["<s>", "<pad>", "</s>", "<unk>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>"),
    "llama": dict(tokens=["<|begin_of_text|>", "<|end_of_text|>", "<unk>"], bos="<|begin_of_text|>",
                  eos="<|end_of_text|>", pad=None, unk="<unk>"),
    "mistral": dict(tokens=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None, unk="<unk>"),
    "qwen2": dict(tokens=["<|endoftext|>", "<unk>"], bos=None, eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>"),
}
SPECIALS["xlm-roberta"] = SPECIALS["roberta"]
VOCAB = 96


def tiny_tokenizer(arch: str, vocab_size: int = VOCAB):
    """A word-level fast tokenizer of ``vocab_size`` entries (the family's specials, then
    ``w0``, ``w1``, ...), adding the family's own start/end tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = SPECIALS[arch]
    names = spec["tokens"] + [f"w{i}" for i in range(vocab_size - len(spec["tokens"]))]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=spec["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ends = [t for t in (spec["bos"], "$A", spec["eos"] if FAMILIES[arch].kind == "encoder" else None) if t]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(ends), special_tokens=[(t, vocab[t]) for t in ends if t != "$A"])
    named = {k + "_token": spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def tiny_model(arch: str, task: str = "classification", *, layers: int = 3, seed: int = 0, num_labels: int = 2):
    """A seeded random model of ``arch`` (hidden 32, 4 heads) and its tiny tokenizer."""
    import transformers as tf

    tok = tiny_tokenizer(arch)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    if arch in ("bert", "roberta", "xlm-roberta"):
        cfg_cls, model_cls = {"bert": (tf.BertConfig, tf.BertForSequenceClassification),
                              "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification),
                              "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaForSequenceClassification)}[arch]
        extra = {} if arch == "bert" else dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
        return model_cls(cfg_cls(**common, **extra)).eval(), tok
    cfg_cls, prefix = {"llama": (tf.LlamaConfig, "Llama"), "mistral": (tf.MistralConfig, "Mistral"),
                       "qwen2": (tf.Qwen2Config, "Qwen2")}[arch]
    extra = dict(num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 tie_word_embeddings=arch != "mistral")
    if arch == "mistral":
        extra["sliding_window"] = 4
    kind = "ForSequenceClassification" if task == "classification" else "ForCausalLM"
    return getattr(tf, prefix + kind)(cfg_cls(**common, **extra)).eval(), tok


def padded_batch(tok, side: str, lengths=LENGTHS, seed: int = 0):
    """Random word ids (no specials) between the family's own start/end tokens, padded on
    ``side`` with the pad id. Returns ``(ids [B, T], mask [B, T], rows)``; ``rows`` are the
    unpadded examples."""
    g = torch.Generator().manual_seed(seed)
    specials = sorted(set(tok.all_special_ids))
    low = max(specials) + 1
    rows = []
    for n in lengths:
        words = torch.randint(low, VOCAB, (n,), generator=g).tolist()
        text = " ".join(tok.convert_ids_to_tokens(words))
        rows.append(torch.tensor(tok(text)["input_ids"], dtype=torch.long))
    t = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
        ids[i, where], mask[i, where] = r, 1
    return ids, mask, rows


@torch.no_grad()
def max_difference(arch: str, protocol: str, task: str, side: str, split_layer: int = 1) -> float:
    """max |split - unsplit| over the batch's classification logits (or every real position's
    next-token logits): the split on a batch padded on ``side``, the unsplit model on each
    example alone."""
    model, tok = tiny_model(arch, task)
    reference = copy.deepcopy(model)  # untouched by the graft
    split = load_split(arch, split_layer, task, 2, hf_model=model, tokenizer=tok, lora_rank=0, protocol=protocol)
    ids, mask, rows = padded_batch(split.tokenizer, side)
    split.top.eval()
    got = split.top(split.bottom(ids, mask), mask)
    worst = 0.0
    for i, row in enumerate(rows):
        want = reference(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long)).logits[0]
        mine = got[i] if task == "classification" else got[i][mask[i].bool()]
        assert mine.shape == want.shape, (mine.shape, want.shape)
        worst = max(worst, float((mine - want).abs().max()))
    if protocol == "u-shaped":  # the two machines' halves composed by hand give the same
        composed = split.head(split.middle(split.bottom(ids, mask), mask), mask)
        assert torch.equal(composed, got)
    return worst


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch,protocol,task", CASES)
def test_split_equals_unsplit_for_any_padding_side(arch, protocol, task, side):
    assert max_difference(arch, protocol, task, side) < TOL


@pytest.mark.parametrize("split_layer", [0, 3])  # right after the embeddings; every block on the device
@pytest.mark.parametrize("protocol", ["vanilla", "u-shaped"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_at_the_ends_equals_unsplit(arch, protocol, split_layer):
    for side in ("right", "left"):
        assert max_difference(arch, protocol, "classification", side, split_layer) < TOL


def test_each_family_keeps_its_own_head():
    names = {}
    for arch in ARCHS:
        model, tok = tiny_model(arch)
        split = load_split(arch, 1, hf_model=model, tokenizer=tok, lora_rank=2)
        names[arch] = {n for n, p in split.top.named_parameters() if p.requires_grad and "lora_" not in n}
    for arch in ("roberta", "xlm-roberta"):  # dense + tanh + out_proj on <s>, no pooler
        assert {n.rsplit(".", 3)[-3] + "." + n.rsplit(".", 2)[-2] for n in names[arch]} == {"default.dense", "default.out_proj"}, names[arch]
        assert not any("pooler" in n for n in names[arch])
    assert all("classifier" in n for n in names["bert"]) and len(names["bert"]) == 2
    for arch in DECODERS:
        assert all("score" in n for n in names[arch]) and len(names[arch]) == 1


def test_roberta_bottom_positions_start_after_padding_idx():
    """RoBERTa's own positions (padding_idx + 1 onwards), from the mask: the bottom equals the unsplit
    model's embeddings-plus-first-block on a left-padded batch, where a plain arange would not."""
    model, tok = tiny_model("roberta")
    reference = copy.deepcopy(model)
    split = load_split("roberta", 1, hf_model=model, tokenizer=tok, lora_rank=0)
    ids, mask, rows = padded_batch(tok, "left")
    hidden = split.bottom(ids, mask)
    for i, row in enumerate(rows):
        want = reference.roberta(input_ids=row[None], output_hidden_states=True).hidden_states[1][0]
        assert (hidden[i][mask[i].bool()] - want).abs().max() < TOL


def test_llama3_style_tokenizer_without_pad_pads_with_end_of_text():
    model, tok = tiny_model("llama")
    assert tok.pad_token_id is None
    split = load_split("llama3", 1, hf_model=model, tokenizer=tok, lora_rank=0)
    assert split.tokenizer.pad_token == "<|end_of_text|>" and split.tokenizer.padding_side == "left"
    assert split.full.config.pad_token_id == split.tokenizer.pad_token_id


def test_unsupported_architecture_names_its_class_and_the_families():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2ForSequenceClassification \(model_type='gpt2'\); "
                                         r"supported families: BERT \(bert\), RoBERTa \(roberta\), XLM-R.*Qwen2 \(qwen2\)"):
        load_split("gpt2", 1, hf_model=model, tokenizer=tiny_tokenizer("llama"))


@pytest.mark.parametrize("arch", ["roberta", "mistral"])
@pytest.mark.parametrize("bad", [-1, 4])
def test_split_layer_outside_depth_is_refused(arch, bad):
    model, tok = tiny_model(arch)
    with pytest.raises(ValueError, match=rf"split_layer={bad} is outside 0\.\.3"):
        load_split(arch, bad, hf_model=model, tokenizer=tok)


# --- placement: device and dtype per part --------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(bottom_dtype="float16"), r"bottom_dtype='float16' on bottom_device='cpu' is refused.*use bfloat16"),
    (dict(top_dtype="float16"), r"top_dtype='float16' on top_device='cpu' is refused"),
    (dict(top_dtype="int8"), r"top_dtype='int8' is not supported; accepted: float32, bfloat16, float16"),
    (dict(bottom_device="tpu"), r"bottom_device='tpu' is not supported; accepted: cpu, cuda, cuda:<index>"),
    (dict(bottom_device="cpu:1"), r"bottom_device='cpu:1' is not supported"),
])
def test_bad_placements_are_refused(kwargs, message):
    model, tok = tiny_model("bert")
    with pytest.raises(ValueError, match=message):
        load_split("bert", 1, hf_model=model, tokenizer=tok, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    model, tok = tiny_model("bert")
    with pytest.raises(ValueError, match=r"top_device='cuda' needs a CUDA GPU.*accepted here: cpu"):
        load_split("bert", 1, hf_model=model, tokenizer=tok, top_device="cuda")


def test_bfloat16_bottom_releases_float32_and_noise_is_added_in_float32():
    """A bfloat16 bottom returns float32 (its values exactly, widened), so the defence draws and
    adds its noise in float32 and releases float32. A bfloat16 tensor handed to a defence directly
    is perturbed in float32 and cast back: the same numbers as the float32 release, rounded."""
    from privtune_flwr.defenses import build_defense

    model, tok = tiny_model("llama")
    exact = load_split("llama", 1, hf_model=copy.deepcopy(model), tokenizer=copy.deepcopy(tok), lora_rank=0)
    half = load_split("llama", 1, hf_model=model, tokenizer=tok, lora_rank=0, bottom_dtype="bfloat16")
    assert {p.dtype for p in half.bottom.parameters()} == {torch.bfloat16}
    # the top's blocks stay float32 (its graft still holds the bottom's embedding, which it never runs)
    assert {p.dtype for n, p in half.top.named_parameters() if "embed_tokens" not in n} == {torch.float32}
    ids, mask, _ = padded_batch(tok, "left")
    h16, h32 = half.bottom(ids, mask), exact.bottom(ids, mask)
    assert h16.dtype == torch.float32
    real = mask.bool()
    rel = float((h16 - h32)[real].norm() / h32[real].norm())
    assert rel < 2e-2, rel  # bfloat16 keeps 8 bits of mantissa
    defense = build_defense("dchi", epsilon=50.0, split=half, seed=3)
    released = defense(h16, ids, mask)
    assert released.dtype == torch.float32
    cast_back = defense(h16.to(torch.bfloat16), ids, mask)
    assert cast_back.dtype == torch.bfloat16
    assert torch.equal(cast_back, released.to(torch.bfloat16))
    # and the split still computes what the float32 one does, to bfloat16's precision
    logits16, logits32 = half.top(h16, mask), exact.top(h32, mask)
    assert (logits16 - logits32).abs().max() < 5e-2


def test_bfloat16_top_trains_float32_lora_and_head():
    model, tok = tiny_model("roberta")
    split = load_split("roberta", 1, hf_model=model, tokenizer=tok, lora_rank=2, top_dtype="bfloat16")
    trainable = {n: p for n, p in split.top.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen_blocks = {p.dtype for n, p in split.top.named_parameters() if "layer.1." in n and "lora_" not in n}
    assert frozen_blocks == {torch.bfloat16}
    ids, mask, _ = padded_batch(tok, "right")
    before = split.trainable_state()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        logits = split.top(split.bottom(ids, mask), mask)
        assert logits.dtype == torch.float32 and logits.shape == (len(LENGTHS), 2)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = split.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k)


def _table() -> None:
    print(f"{'family':<12} {'protocol':<9} {'task':<15} {'right pad':>10} {'left pad':>10}")
    for arch, protocol, task in CASES:
        right, left = (max_difference(arch, protocol, task, s) for s in ("right", "left"))
        print(f"{arch:<12} {protocol:<9} {task:<15} {right:>10.2e} {left:>10.2e}")


if __name__ == "__main__":
    _table()


# --- the pipeline on a non-BERT encoder given as a folder ----------------------------------------
# (the tiny RoBERTa folder is tests/conftest.py's `roberta_folder` fixture)


def _sentences(n: int, seed: int = 0):
    """Two classes told apart by which half of the vocabulary their words come from."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = torch.randint(4 + 46 * label, 50 + 46 * label, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        texts.append(" ".join(f"w{int(w) - 4}" for w in words))
        labels.append(label)
    return texts, labels


def test_roberta_folder_runs_anchors_importance_and_label_defences(roberta_folder, tmp_path, monkeypatch):
    from privtune_flwr.defenses import build_defense
    from privtune_flwr.device import device_defense

    monkeypatch.setenv("PRIVTUNE_CACHE", str(tmp_path))  # this folder's anchor tables, built afresh
    split = load_split(roberta_folder, 1, "classification", 2, lora_rank=2)
    assert (split.architecture, split.family, split.vocab_size) == ("roberta", "encoder", VOCAB)
    assert sorted(split.special_ids.tolist()) == [0, 1, 2, 3]
    texts, labels = _sentences(24)
    enc = split.tokenize(texts[:4], 16)
    assert enc["input_ids"][:, 0].eq(0).all()  # <s> first; RoBERTa pads with 1 on the right
    hidden = split.bottom(**enc)
    mask = enc["attention_mask"]

    privtune = build_defense("privtune", epsilon=8.0, split=split, seed=0)
    assert privtune.anchors.shape == (VOCAB, 32)
    released = privtune(hidden, enc["input_ids"], mask)
    assert released.shape == hidden.shape and torch.isfinite(released).all()
    assert float((released - hidden)[mask.bool()].norm(dim=-1).min()) > 0  # every real token moved
    assert float(released[~mask.bool()].abs().max()) == 0.0  # padding released as zeros

    with_importance = device_defense("privtune", split, epsilon=8.0, texts=texts, labels=labels, seed=0)
    assert torch.isfinite(with_importance(hidden, enc["input_ids"], mask)).all()

    subspace = device_defense("label-subspace", split, epsilon=64.0, texts=texts, labels=labels, subspace_rank=2, seed=0)
    out = subspace(hidden, enc["input_ids"], mask)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    # the top reads what was released: <s>'s row goes through RoBERTa's own classifier
    assert split.top(out, mask).shape == (4, 2)
