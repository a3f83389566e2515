"""Attacks of the honest-but-curious cloud (spec §4), used to verify every privacy claim.

Threat model: the attacker sees exactly the released representations and attention masks,
knows the bottom model, the defence and its parameters, and holds public auxiliary text from a
different dataset. Two attacker protocols
(``run_attacks(..., protocols=...)``): the *adaptive* attacker trains every learned attack on
auxiliary text passed through the same bottom and the same defence; the *static* one trains on
clean auxiliary representations (as inversion attacks fitted without the defence's noise do).
Neither ever sees victim data in training; epoch counts are fixed (no model selection on the
victim set); both are scored on the victim's release.

    aux = release(split, defense, aux_texts, attributes={"label": aux_labels})
    victim = release(split, defense, victim_texts, attributes={"label": victim_labels})
    run_attack("eia-mlp", split, aux, victim)            # {"attack", "asr", "metric", ...}
    run_attacks(split, defense, aux_texts, victim_texts, protocols=("adaptive", "static"), ...)

Every ``Attack`` has ``fit(aux)`` (the only place it learns) and ``score(victim)`` (inference).
"""

from __future__ import annotations

import hashlib
import json
import time

from ..models import SplitModel
from .base import Attack, Released, release, real_token_mask
from .inference import AttributeInference, BagOfWordsInference, KeywordInference
from .inversion import ContextInversion, KnnInversion, MlpInversion, context_free_anchors, nearest_anchor
from .keywords import GENERIC_KEYWORDS, MOVIE_GENRE_CLASSES, MOVIE_GENRE_KEYWORDS, genre_attribute, top_classes

ATTACKS = ("eia-knn", "eia-mlp", "eia-context", "aia-attribute", "aia-keyword", "aia-bow")

_CLASSES: dict[str, type[Attack]] = {
    "eia-knn": KnnInversion,
    "eia-mlp": MlpInversion,
    "eia-context": ContextInversion,
    "aia-attribute": AttributeInference,
    "aia-keyword": KeywordInference,
    "aia-bow": BagOfWordsInference,
}

__all__ = [
    "ATTACKS", "PROTOCOLS", "Attack", "Released", "release", "run_attack", "run_attacks", "make_attack", "real_token_mask",
    "context_free_anchors", "nearest_anchor", "GENERIC_KEYWORDS", "MOVIE_GENRE_CLASSES", "MOVIE_GENRE_KEYWORDS",
    "genre_attribute", "top_classes",
]


def make_attack(name: str, split: SplitModel, *, attribute=None, keywords=None, seed: int = 0, epochs=None,
                anchors=None, **options) -> Attack:
    """An unfitted attack ``name``.

    The shared arguments (``attribute``, ``keywords``, ``epochs``, ``anchors``) reach only the
    attacks that use them, so one call pattern serves all six; any other option an attack does
    not know is rejected (ValueError).
    """
    if name not in _CLASSES:
        raise ValueError(f"attack={name!r} is unknown; accepted: {', '.join(ATTACKS)}")
    cls = _CLASSES[name]
    shared = {"attribute": attribute, "keywords": keywords, "epochs": epochs, "anchors": anchors}
    given = {**{k: v for k, v in shared.items() if k in cls.defaults}, **options}
    return cls(split, seed=seed, **given)


def run_attack(name: str, split: SplitModel, aux: Released, victim: Released, *, attribute=None, keywords=None,
               seed: int = 0, epochs=None, anchors=None, **options) -> dict:
    """Fit attack ``name`` on ``aux`` and score it on ``victim``.

    ``aux``/``victim``: :class:`Released` through the same bottom and defence. ``attribute``
    (AIA-1) names a key of ``Released.attributes``; ``keywords`` (AIA-2/3) is a list of words;
    ``epochs`` overrides the attack's fixed epoch count; ``anchors`` ``[V, d]`` (EIA-1) defaults
    to the context-free anchors computed from the bottom. Returns ``{"attack", "asr", "metric",
    "seconds", ...}`` with attack-specific extra fields; ASR is in [0, 1].
    """
    for role, data in (("aux", aux), ("victim", victim)):
        if not isinstance(data, Released):
            raise ValueError(f"{role} must be a Released, got {type(data).__name__}")
        if len(data) == 0:  # Released rejects this at construction; kept for hand-built objects
            raise ValueError(f"{role} holds no sequence")
    attack = make_attack(name, split, attribute=attribute, keywords=keywords, seed=seed, epochs=epochs,
                         anchors=anchors, **options)
    start = time.perf_counter()
    attack.fit(aux)
    result = attack.score(victim)
    return {"attack": name, **result, "seconds": time.perf_counter() - start}


# The clean-release attacker depends only on the model, the texts, the attack and its options, not on
# the defence under test: sweeps reuse it (its clean score, and for the static protocol the fitted
# attacker itself) instead of refitting per point.
_CLEAN: dict[str, tuple[Attack, dict]] = {}

PROTOCOLS = ("adaptive", "static")


def _clean_key(split, name, texts_digest: str, kwargs, max_length) -> str:
    blob = json.dumps([split.name, split.split_layer, name, texts_digest, max_length,
                       {k: v for k, v in kwargs.items() if k != "anchors"}], sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fit_and_score(name: str, split: SplitModel, aux: Released, victim: Released, kwargs: dict) -> tuple[Attack, dict]:
    attack = make_attack(name, split, **kwargs)
    start = time.perf_counter()
    attack.fit(aux)
    result = attack.score(victim)
    return attack, {"attack": name, **result, "seconds": time.perf_counter() - start}


def run_attacks(split: SplitModel, defense, aux_texts, victim_texts, *, aux_attributes=None, victim_attributes=None,
                attribute=None, keywords=None, names=ATTACKS, max_length: int = 64, batch_size: int = 32,
                seed: int = 0, options: dict[str, dict] | None = None,
                protocols: tuple[str, ...] = ("adaptive",)) -> list[dict]:
    """Every attack in ``names`` against ``defense``, under each attacker protocol in ``protocols``.

    * ``adaptive``: the attacker trains on auxiliary text released through the same bottom and the
      same defence (it knows the defence and its parameters), then scores the victim's release;
    * ``static``: the attacker trains on *clean* auxiliary representations (no defence), then
      scores the victim's defended release, as inversion attacks fitted without the defence's
      noise do.

    EIA-1 (nearest anchor) trains on nothing, so its two protocols give the same number. Each
    result dict carries ``protocol``, ``asr_clean`` (the clean attacker on the clean victim
    release) and ``clean`` (its full result), so a table shows how much a defence removes.
    ``options`` maps an attack name to extra keyword options (e.g. ``{"eia-mlp": {"hidden": 512}}``).
    """
    from ..defenses import build_defense

    names = tuple(names)
    unknown = [n for n in names if n not in _CLASSES]
    if unknown:
        raise ValueError(f"attack names {unknown} are unknown; accepted: {', '.join(ATTACKS)}")
    protocols = tuple(protocols)
    bad_protocols = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or bad_protocols:
        raise ValueError(f"protocols={list(protocols)!r} is not accepted; accepted: one or more of {', '.join(PROTOCOLS)}")
    options = dict(options or {})
    bad = sorted(set(options) - set(names))
    if bad:
        raise ValueError(f"options given for attacks {bad} that are not run; running: {list(names)}")
    if "aia-attribute" in names and attribute is None:
        raise ValueError("attack 'aia-attribute' needs attribute=<name of a key of aux/victim attributes>")
    if any(n in names for n in ("aia-keyword", "aia-bow")) and not keywords:
        raise ValueError(f"attacks 'aia-keyword'/'aia-bow' need keywords=[...]; got {keywords!r}")

    anchors = getattr(defense, "anchors", None)  # same table the attacker would compute itself
    clean_defense = build_defense("none", split=split)
    releases = {}
    for label, d in (("defended", defense), ("clean", clean_defense)):
        if label == "clean" and getattr(defense, "name", None) == "none":
            releases["clean"] = releases["defended"]
            continue
        releases[label] = (
            release(split, d, aux_texts, max_length, batch_size, aux_attributes),
            release(split, d, victim_texts, max_length, batch_size, victim_attributes),
        )
    texts_digest = hashlib.sha256(json.dumps([list(aux_texts), list(victim_texts)]).encode()).hexdigest()
    aux_def, victim_def = releases["defended"]
    results = []
    for name in names:
        kwargs = dict(options.get(name, {}), attribute=attribute, keywords=keywords, seed=seed)
        if name == "eia-knn":
            kwargs["anchors"] = anchors
        key = _clean_key(split, name, texts_digest, kwargs, max_length)
        if key not in _CLEAN:
            _CLEAN[key] = _fit_and_score(name, split, *releases["clean"], kwargs)
        clean_attack, clean = _CLEAN[key]
        for protocol in protocols:
            if releases["clean"] is releases["defended"]:
                result = clean  # no defence: both protocols are the clean attacker
            elif protocol == "adaptive":
                result = _fit_and_score(name, split, aux_def, victim_def, kwargs)[1]
            else:
                start = time.perf_counter()
                result = {"attack": name, **clean_attack.score(victim_def), "seconds": time.perf_counter() - start}
            results.append({**result, "protocol": protocol,
                            "defense": getattr(defense, "name", type(defense).__name__),
                            "epsilon": getattr(defense, "epsilon", None), "asr_clean": clean["asr"], "clean": clean})
    return results
