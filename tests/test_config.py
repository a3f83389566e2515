"""RunConfig: one source of truth mirrored by pyproject, validated with clear errors."""

import math
import tomllib
from pathlib import Path

import pytest

from privtune_flwr.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_mirrors_runconfig_defaults():
    from flwr.common.config import flatten_dict

    from privtune_flwr.preflight import app_defaults

    # Flower's own flattening of the dotted keys gives RunConfig's keys and defaults, and so does ours
    app_config = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert app_config == RunConfig().to_flower() == app_defaults()
    assert RunConfig.from_flower(app_config) == RunConfig()
    # and the table is the one RunConfig generates, to the letter: a default lives in RunConfig alone
    from privtune_flwr.config import pyproject_table

    text = (ROOT / "pyproject.toml").read_text()
    assert text[text.index("[tool.flwr.app.config]"):] == pyproject_table()


def test_every_key_is_grouped_and_a_flat_key_of_before_names_its_new_key():
    from dataclasses import fields

    from privtune_flwr.keys import GROUPS, KEYS, RENAMED

    assert sorted(KEYS) == sorted(f.name for f in fields(RunConfig))
    assert all(k.split(".")[0] in {g.split(".")[0] for g in GROUPS} and "." in k for k in RunConfig().to_flower())
    assert len(RENAMED) == len(KEYS) == len(set(KEYS.values()))
    for old, new in (("split-layer", "model.split-layer"), ("num-rounds", "federation.num-rounds"), ("epsilon", "defense.epsilon"),
                     ("subspace-fit-scope", "defense.label-subspace.fit-scope"), ("dataset", "data.name"), ("seed", "run.seed")):
        assert RENAMED[old] == new
        with pytest.raises(ValueError, match=f"^'{old}' is no longer a run-config key: it is '{new}' now"):
            RunConfig.from_flower({old: RunConfig().to_flower()[new]})
    # the launcher's check gives the same line, beside the other problems, before anything starts
    from privtune_flwr.config import collect_errors

    _, errors = collect_errors({"num-rounds": 2, "model.split-layer": -1})
    assert errors[0].startswith("'num-rounds' is no longer a run-config key: it is 'federation.num-rounds' now")
    assert errors[1].startswith("model.split-layer=-1 is outside the accepted range")


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("defense.epsilon", 0.0, "defense.epsilon=0.0"),
        ("defense.epsilon", -1.0, "defense.epsilon=-1.0"),
        ("defense.epsilon", math.nan, "defense.epsilon=nan"),
        ("federation.devices-per-round", 0, "federation.devices-per-round=0"),
        ("federation.min-devices", 0, "federation.min-devices=0"),
        ("model.split-layer", -1, "model.split-layer=-1"),
        ("data.partitioner", "zipf", "data.partitioner='zipf'"),
        ("train.learning-rate", 0.0, "train.learning-rate=0.0"),
        ("train.batch-size", 0, "train.batch-size=0"),
        ("model.lora-targets", "mlp", "model.lora-targets='mlp'"),
    ],
)
def test_bad_values_name_the_value_and_range(key, value, needle):
    with pytest.raises(ValueError) as err:
        RunConfig.from_flower({key: value})
    assert needle in str(err.value) and "accepted" in str(err.value)


def test_label_subspace_is_refused_for_generation_when_the_config_is_read():
    with pytest.raises(ValueError, match="defense.name='label-subspace' is outside the accepted range: a defence other than 'label-subspace' or 'label-obfuscator' for data.task='generation'"):
        RunConfig.from_flower({"data.task": "generation", "federation.protocol": "u-shaped", "defense.name": "label-subspace"})
    assert RunConfig.from_flower({"data.task": "generation", "federation.protocol": "u-shaped", "defense.name": "dchi"}).defense == "dchi"


def test_unknown_key_and_bad_type():
    with pytest.raises(ValueError, match="^unknown key 'defense.epsilonn'; did you mean 'defense.epsilon'\\?$"):
        RunConfig.from_flower({"defense.epsilonn": 1.0})
    with pytest.raises(ValueError, match="^unknown key 'federation.num-round'; did you mean 'federation.num-rounds'\\?$"):
        RunConfig.from_flower({"federation.num-round": 3})
    # a misspelt key in the wrong group is still found by its last part
    with pytest.raises(ValueError, match="^unknown key 'train.num-round'; did you mean 'federation.num-rounds'\\?$"):
        RunConfig.from_flower({"train.num-round": 3})
    # nothing close: the accepted keys are listed
    last = sorted(RunConfig().to_flower())[-1]  # the accepted keys, sorted, to the last one
    with pytest.raises(ValueError, match=f"unknown key 'zzz'; accepted: data.dirichlet-alpha, data.max-examples, .*{last}$"):
        RunConfig.from_flower({"zzz": 1})
    with pytest.raises(ValueError, match="federation.num-rounds=2.5"):
        RunConfig.from_flower({"federation.num-rounds": 2.5})


def test_defense_options_follow_the_defense():
    assert RunConfig(defense="none").defense_options() == {}
    assert set(RunConfig(defense="gaussian").defense_options()) == {"delta", "clip"}
    assert RunConfig(defense="privtune", pgd_steps=3).defense_options()["pgd_steps"] == 3


def test_lora_target_choices_match_the_models():
    from privtune_flwr import config, models

    assert config.LORA_TARGET_CHOICES == models.LORA_TARGET_CHOICES


def test_subspace_fit_choices_match_the_mechanism():
    from privtune_flwr import config
    from privtune_flwr.mechanism import subspace

    assert config.SUBSPACE_FITS == subspace.SUBSPACE_FITS
    assert RunConfig(defense="label-subspace", subspace_fit="closed-form").defense_options()["subspace_fit"] == "closed-form"
    assert "subspace_fit" not in RunConfig(defense="label-obfuscator").defense_options()
    with pytest.raises(ValueError, match="defense.label-subspace.fit='lda'.*'reader' or 'closed-form'"):
        RunConfig(subspace_fit="lda")


def test_defense_names_match_the_defenses():
    from privtune_flwr.config import DEFENSE_NAMES
    from privtune_flwr.defenses import DEFENSES

    assert DEFENSE_NAMES == tuple(DEFENSES)
    with pytest.raises(ValueError, match="defense.name='nonsense' is outside the accepted range: none, dchi, gaussian, privtune"):
        RunConfig.from_flower({"defense.name": "nonsense"})


def test_banner_shows_only_the_settings_that_apply():
    assert RunConfig(defense="none").defense_summary() == "defense=none (representations released without noise)"
    assert RunConfig(defense="dchi", epsilon=32.0).defense_summary() == "defense=dchi eps=32"
    assert RunConfig(defense="gaussian").defense_summary() == "defense=gaussian eps=64 delta=1e-05 clip=auto"
    assert RunConfig(defense="privtune").defense_summary() == "defense=privtune eps=64 n-hops=2 k=8 s-min=0.5 radius-scale=1"
    assert RunConfig().defense_summary() == "defense=label-subspace eps=64 rank=2"  # the default
    assert RunConfig(defense="dchi", release="fresh", reproducible_noise=True).defense_summary() == \
        "defense=dchi eps=64 release=fresh REPRODUCIBLE NOISE (not private against the operator)"
