"""Sensitive keywords and per-sequence attributes for the attribute inference attacks.

Per dataset:

* **Movie reviews** (Rotten Tomatoes victim, IMDB auxiliary). Keywords for AIA-2/AIA-3 are genre
  words (``MOVIE_GENRE_KEYWORDS``). The AIA-1 attribute follows DP-Forward: a review's class is
  the genre-keyword class it mentions (``MOVIE_GENRE_CLASSES``, see :func:`genre_attribute`);
  reviews that mention none, or several classes, get ``-1`` and are left out of training and
  scoring. Sentiment (the task label) is a second, strongly encoded attribute.
* **Drug reviews**: the attribute is the ``condition`` column restricted to its most frequent
  classes (:func:`top_classes`, e.g. ``k=5``); keywords are health words (``GENERIC_KEYWORDS``).
* **Speeches / debates**: the attribute is the speaker's ``party`` (:func:`top_classes` on the
  party column); keywords are places, people and health words.

Keywords are matched as **single tokens** of the split's tokenizer: a word that the tokenizer
splits into several pieces is dropped by :func:`keyword_token_ids` (and reported), because
"occurs" is then a clean, position-free test on the released token ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

MOVIE_GENRE_CLASSES: dict[str, tuple[str, ...]] = {
    "horror": ("horror", "scary", "slasher", "zombie", "vampire", "gore"),
    "comedy": ("comedy", "comedic", "funny", "hilarious", "laughs"),
    "romance": ("romance", "romantic", "love"),
    "documentary": ("documentary",),
    "thriller": ("thriller", "suspense", "mystery", "crime"),
    "animation": ("animated", "animation", "cartoon", "disney"),
    "action": ("action", "fight", "explosions", "war"),
    "drama": ("drama", "dramatic", "tragedy"),
    "science fiction": ("sci", "fi", "alien", "space", "future"),
    "family": ("family", "kids", "children"),
}

MOVIE_GENRE_KEYWORDS: tuple[str, ...] = tuple(w for words in MOVIE_GENRE_CLASSES.values() for w in words)

# Places, people and health conditions: the usual "sensitive words" of keyword inference.
GENERIC_KEYWORDS: tuple[str, ...] = (
    # places
    "america", "london", "paris", "china", "india", "york", "california", "texas", "hospital", "church",
    # people / groups
    "mother", "father", "wife", "husband", "son", "daughter", "doctor", "police", "president", "girl", "boy",
    # health
    "cancer", "diabetes", "depression", "anxiety", "pain", "pregnant", "pregnancy", "weight", "sleep",
    "blood", "heart", "infection", "migraine", "acne", "insomnia", "adhd", "bipolar", "asthma",
)


def keyword_token_ids(tokenizer, keywords: Iterable[str]) -> tuple[list[str], torch.Tensor, list[str]]:
    """Map words to single token ids of ``tokenizer``, as the word appears inside running text.

    A byte-level BPE tokenizer (SmolLM2's) codes a word after a space as its own token
    (``Ġgovernment``), different from the bare word at the start of a text; WordPiece (MiniLM)
    codes both alike. So the word is encoded after a space, and bare only when that is not one
    token. Returns ``(kept_words, ids [K], dropped_words)``; a word is dropped when neither form is
    exactly one token (without special tokens) or its id repeats one already kept.
    """
    kept, ids, dropped = [], [], []
    for word in keywords:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"keyword {word!r} is not a non-empty string")
        pieces = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] in ids:
            dropped.append(word)
            continue
        kept.append(word)
        ids.append(int(pieces[0]))
    return kept, torch.tensor(ids, dtype=torch.long), dropped


def keyword_presence(input_ids: torch.Tensor, attention_mask: torch.Tensor, keyword_ids: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` 0/1: does keyword ``k`` occur among the real tokens of sequence ``n``."""
    real = input_ids.masked_fill(attention_mask == 0, -1)
    return (real.unsqueeze(-1) == keyword_ids.view(1, 1, -1)).any(1).long()


def genre_attribute(texts: Sequence[str], classes: dict[str, Sequence[str]] | None = None) -> tuple[torch.Tensor, list[str]]:
    """DP-Forward-style genre class of each review: ``(labels [N], class_names)``.

    A review's label is the index of the one genre class whose words it mentions (whole words,
    case-insensitive); ``-1`` when it mentions none or more than one class.
    """
    classes = dict(MOVIE_GENRE_CLASSES if classes is None else classes)
    names = list(classes)
    patterns = [re.compile(r"\b(" + "|".join(map(re.escape, classes[n])) + r")\b", re.IGNORECASE) for n in names]
    labels = []
    for text in texts:
        found = [i for i, pattern in enumerate(patterns) if pattern.search(text)]
        labels.append(found[0] if len(found) == 1 else -1)
    return torch.tensor(labels, dtype=torch.long), names


def top_classes(values: Sequence[str], k: int, classes: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Encode a categorical column (drug ``condition``, speaker ``party``) as class ids.

    The classes are ``classes`` when given (use the auxiliary set's, so victim ids agree),
    otherwise the ``k`` most frequent values; everything else gets ``-1`` (left out).
    """
    if classes is None:
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"k={k!r} must be an integer >= 2")
        classes = [v for v, _ in Counter(values).most_common(k)]
    index = {v: i for i, v in enumerate(classes)}
    return torch.tensor([index.get(v, -1) for v in values], dtype=torch.long), list(classes)
