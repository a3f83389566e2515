"""RunConfig: one source of truth mirrored by pyproject, validated with clear errors."""

import math
import tomllib
from pathlib import Path

import pytest

from privtune_flwr.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_mirrors_runconfig_defaults():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().to_flower()
    assert RunConfig.from_flower(app_config) == RunConfig()


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("epsilon", 0.0, "epsilon=0.0"),
        ("epsilon", -1.0, "epsilon=-1.0"),
        ("epsilon", math.nan, "epsilon=nan"),
        ("devices-per-round", 0, "devices-per-round=0"),
        ("min-devices", 0, "min-devices=0"),
        ("split-layer", -1, "split-layer=-1"),
        ("partitioner", "zipf", "partitioner='zipf'"),
        ("learning-rate", 0.0, "learning-rate=0.0"),
        ("batch-size", 0, "batch-size=0"),
        ("lora-targets", "mlp", "lora-targets='mlp'"),
    ],
)
def test_bad_values_name_the_value_and_range(key, value, needle):
    with pytest.raises(ValueError) as err:
        RunConfig.from_flower({key: value})
    assert needle in str(err.value) and "accepted" in str(err.value)


def test_label_subspace_is_refused_for_generation_when_the_config_is_read():
    with pytest.raises(ValueError, match="defense='label-subspace' is outside the accepted range: a defence other than 'label-subspace' or 'label-obfuscator' for task='generation'"):
        RunConfig.from_flower({"task": "generation", "protocol": "u-shaped", "defense": "label-subspace"})
    assert RunConfig.from_flower({"task": "generation", "protocol": "u-shaped", "defense": "dchi"}).defense == "dchi"


def test_unknown_key_and_bad_type():
    with pytest.raises(ValueError, match="^unknown key 'epsilonn'; did you mean 'epsilon'\\?$"):
        RunConfig.from_flower({"epsilonn": 1.0})
    with pytest.raises(ValueError, match="^unknown key 'num-round'; did you mean 'num-rounds'\\?$"):
        RunConfig.from_flower({"num-round": 3})
    # nothing close: the accepted keys are listed
    last = sorted(RunConfig().to_flower())[-1]  # the accepted keys, sorted, to the last one
    with pytest.raises(ValueError, match=f"unknown key 'zzz'; accepted: alpha, audit-tokens, .*{last}$"):
        RunConfig.from_flower({"zzz": 1})
    with pytest.raises(ValueError, match="num-rounds=2.5"):
        RunConfig.from_flower({"num-rounds": 2.5})


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
    with pytest.raises(ValueError, match="subspace-fit='lda'.*'reader' or 'closed-form'"):
        RunConfig(subspace_fit="lda")


def test_defense_names_match_the_defenses():
    from privtune_flwr.config import DEFENSE_NAMES
    from privtune_flwr.defenses import DEFENSES

    assert DEFENSE_NAMES == tuple(DEFENSES)
    with pytest.raises(ValueError, match="defense='nonsense' is outside the accepted range: none, dchi, gaussian, privtune"):
        RunConfig.from_flower({"defense": "nonsense"})


def test_banner_shows_only_the_settings_that_apply():
    assert RunConfig(defense="none").defense_summary() == "defense=none (representations released without noise)"
    assert RunConfig(defense="dchi", epsilon=32.0).defense_summary() == "defense=dchi eps=32"
    assert RunConfig(defense="gaussian").defense_summary() == "defense=gaussian eps=64 delta=1e-05 clip=auto"
    assert RunConfig(defense="privtune").defense_summary() == "defense=privtune eps=64 n-hops=2 k=8 s-min=0.5 radius-scale=1"
    assert RunConfig().defense_summary() == "defense=label-subspace eps=64 rank=2"  # the default
    assert RunConfig(defense="dchi", release="fresh", reproducible_noise=True).defense_summary() == \
        "defense=dchi eps=64 release=fresh REPRODUCIBLE NOISE (not private against the operator)"
