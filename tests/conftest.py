"""Shared fixtures: offline mode, small threads, tiny random models, the real MiniLM once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Derived tables (anchors, dequantised weights) go to a cache inside the checkout, shared by the
# subprocesses of the end-to-end tests; CI starts with it empty.
os.environ.setdefault("PRIVTUNE_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "privtune"))

# A device that keeps its noise key in a file keeps it here (never in the tester's home).
import tempfile

os.environ.setdefault("PRIVTUNE_DEVICE_HOME", tempfile.mkdtemp(prefix="privtune-device-home-"))

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def seeded_entropy(monkeypatch):
    """For statistical tests of noise that a device draws from OS entropy (a fresh key, or a fresh
    release's per-row salt): ``secrets.token_bytes`` reads a seeded stream instead, so the sample,
    and the p-value a test asserts on, is the same on every run. The mechanism is unchanged: only
    where its 16 or 32 random bytes come from."""
    import random
    import secrets

    rng = random.Random(20261130)
    monkeypatch.setattr(secrets, "token_bytes", lambda nbytes=32: rng.randbytes(32 if nbytes is None else nbytes))
    return rng


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from privtune_flwr.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def tiny_hf_model(family: str, task: str = "classification", *, num_labels: int = 2, layers: int = 3, vocab: int = 30522, seed: int = 0):
    """A tiny randomly initialised BERT or Llama (hidden 32) for fast structural tests."""
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    torch.manual_seed(seed)
    if family == "encoder":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=64, num_labels=num_labels, max_position_embeddings=128)
        return BertForSequenceClassification(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, num_labels=num_labels, max_position_embeddings=128,
                      pad_token_id=0)
    cls = LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM
    return cls(cfg).eval()


@pytest.fixture(scope="session")
def minilm_split():
    from privtune_flwr.models import load_split

    return load_split("minilm", split_layer=1, task="classification", num_labels=2)


@pytest.fixture(autouse=True)
def task_identity():
    """Flower 1.42 stamps messages with the running task's identity; tests act as run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


# --- a tiny random RoBERTa given as a folder (issue 25) ------------------------------------------

ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as RoBERTa's own tokenizer numbers them


class LinkGrid:
    """A SuperLink stand-in for grid tests: ``push_messages`` stamps and keeps each message;
    subclasses answer in ``pull_messages``."""

    def __init__(self):
        self.sent = {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent[m.object_id] = m
            ids.append(m.object_id)
        return ids


def corpus_words(names=("rotten_tomatoes", "imdb"), size: int = 600, max_examples: int = 300) -> list[str]:
    """The ``size`` most frequent lowercased words and punctuation marks of the offline corpora
    ``names`` (their train splits, seed 0): a vocabulary that covers most of their text."""
    import re
    from collections import Counter

    from privtune_flwr import data

    counts: Counter = Counter()
    for name in names:
        for text in data.load_dataset(name, seed=0, max_examples=max_examples).train["text"]:
            counts.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    return [w for w, _ in counts.most_common() if w not in ROBERTA_SPECIALS][:size]


def save_tiny_roberta(folder, words=None, *, layers: int = 2, seed: int = 0) -> str:
    """A tiny random RoBERTa (hidden 32, 4 heads) saved with ``save_pretrained`` into ``folder``
    beside a word-level tokenizer built from the same vocabulary: ``<s>``=0, ``<pad>``=1, ``</s>``=2,
    ``<unk>``=3, then ``w0``, ``w1``, ... (``words=None``: ``tests.test_families.tiny_model``'s
    96 entries) or the given ``words`` (lowercased text, so real sentences tokenise)."""
    if words is None:
        from tests.test_families import tiny_model

        model, tok = tiny_model("roberta", layers=layers, seed=seed)
    else:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

        vocab = {t: i for i, t in enumerate(list(ROBERTA_SPECIALS) + list(dict.fromkeys(words)))}
        raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        raw.normalizer = normalizers.Lowercase()
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
        torch.manual_seed(seed)
        cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, num_labels=2, max_position_embeddings=130, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, type_vocab_size=1)
        model = RobertaForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def roberta_folder(tmp_path_factory):
    """A tiny random RoBERTa saved with ``save_pretrained`` beside a word-level tokenizer built
    from the same vocabulary (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, then w0, w1, ...)."""
    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def roberta_words_folder(tmp_path_factory):
    """The same tiny random RoBERTa, with a vocabulary of the 600 most frequent words of Rotten
    Tomatoes and IMDB: for the sweep and the app, which read those corpora."""
    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta-words"), corpus_words())
