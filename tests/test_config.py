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
    ],
)
def test_bad_values_name_the_value_and_range(key, value, needle):
    with pytest.raises(ValueError) as err:
        RunConfig.from_flower({key: value})
    assert needle in str(err.value) and "accepted" in str(err.value)


def test_unknown_key_and_bad_type():
    with pytest.raises(ValueError, match="unknown run-config key 'epsilonn'"):
        RunConfig.from_flower({"epsilonn": 1.0})
    with pytest.raises(ValueError, match="num-rounds=2.5"):
        RunConfig.from_flower({"num-rounds": 2.5})


def test_defense_options_follow_the_defense():
    assert RunConfig(defense="none").defense_options() == {}
    assert set(RunConfig(defense="gaussian").defense_options()) == {"delta", "clip"}
    assert RunConfig(defense="privtune", pgd_steps=3).defense_options()["pgd_steps"] == 3
