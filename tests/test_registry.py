"""The defence registry is the one source of each defence's options, defaults and statement."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from privtune_flwr import registry
from privtune_flwr.config import RunConfig
from privtune_flwr.defenses import DEFENSES, build_defense
from privtune_flwr.models import load_split
from tests.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_split():
    from transformers import AutoTokenizer

    from privtune_flwr.models import resolve_model

    return load_split("tiny-bert", 1, hf_model=tiny_hf_model("encoder", layers=2),
                      tokenizer=AutoTokenizer.from_pretrained(resolve_model("minilm")), lora_rank=0)


def test_every_registered_defence_has_a_class_and_every_class_an_entry():
    assert tuple(registry.DEFENSES) == tuple(DEFENSES)
    for name, cls in DEFENSES.items():
        assert cls.name == name and registry.get(name).name == name


def test_the_run_config_and_the_constructors_take_their_defaults_from_the_registry():
    """One default per option: the run config's, the constructor's and the registry's agree, and
    every option has a line of help."""
    cfg = RunConfig()
    for name, spec in registry.DEFENSES.items():
        accepted = inspect.signature(DEFENSES[name].__init__).parameters
        for option in fields(spec.options):
            assert option.metadata.get("help"), (name, option.name)
            assert getattr(cfg, option.name) == option.default, (name, option.name)
            if option.name in accepted:  # subspace_fit is the device's fit, not the defence's
                assert accepted[option.name].default == option.default, (name, option.name)
    # the disagreement the registry removed: the label defences' rank was 1 in the library, 2 in the app
    assert inspect.signature(DEFENSES["label-subspace"].__init__).parameters["subspace_rank"].default == cfg.subspace_rank
    assert inspect.signature(DEFENSES["label-obfuscator"].__init__).parameters["subspace_rank"].default == cfg.subspace_rank


def test_the_policy_flags_follow_the_mechanism():
    assert [n for n, s in registry.DEFENSES.items() if not s.noisy] == ["none"]
    assert registry.LABEL_DEFENSES == ("label-subspace", "label-obfuscator")
    assert {n for n, s in registry.DEFENSES.items() if s.shifts} == {
        "privtune", "privtune-noimp", "privtune-random-target", "privtune-sampled-target"}
    for name, spec in registry.DEFENSES.items():
        cls = DEFENSES[name]
        assert spec.shifts == bool(getattr(cls, "use_shift", False)), name
        assert spec.scaled == bool(getattr(cls, "use_importance", False)), name


def test_unknown_names_and_options_are_refused_with_the_accepted_ones(tiny_split):
    with pytest.raises(ValueError, match="defense='nope' is unknown; accepted: none, dchi"):
        registry.get("nope")
    with pytest.raises(ValueError, match=r"unknown defence option\(s\) \['radius'\]; accepted: delta, clip, n_hops, k.*obfuscator"):
        build_defense("dchi", epsilon=1.0, split=tiny_split, radius=2.0)


def test_gaussian_clip_zero_means_calibrated_in_the_config_and_the_defence(tiny_split):
    auto = build_defense("gaussian", epsilon=4.0, split=tiny_split, **RunConfig(defense="gaussian").defense_options())
    none = build_defense("gaussian", epsilon=4.0, split=tiny_split, clip=None)
    assert auto.clip == none.clip > 0 and auto.sigma == none.sigma
    assert RunConfig(defense="gaussian").statement().clip is None  # the cloud does not know the calibrated clip
    with pytest.raises(ValueError, match=r"clip=-1.0 is outside the accepted range"):
        build_defense("gaussian", epsilon=4.0, split=tiny_split, clip=-1.0)
