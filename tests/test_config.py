"""Run config: pyproject defaults, presets, overrides, and errors that name the key."""

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedlpt.config import AppConfig, ConfigError, default_run_config, node_bits, node_partition

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def test_pyproject_declares_exactly_the_code_defaults() -> None:
    assert pyproject_run_config() == default_run_config()
    cfg = AppConfig.from_run_config(pyproject_run_config())
    assert (cfg.dataset, cfg.bits, cfg.ema, cfg.ema_decay, cfg.strategy) == (
        "digits",
        8,
        True,
        0.9,
        "fedavg",
    )


@pytest.mark.parametrize("preset", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_overrides_only_declared_keys_and_validates(preset: Path) -> None:
    with open(preset, "rb") as handle:
        overrides = flatten_dict(tomllib.load(handle))
    assert set(overrides) <= set(default_run_config())
    AppConfig.from_run_config({**default_run_config(), **overrides})


def test_strategy_parameters_come_from_the_chosen_strategys_table() -> None:
    config = {**default_run_config(), "strategy.name": "fedavgm"}
    cfg = AppConfig.from_run_config(config)
    assert cfg.strategy_params == {
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "server-learning-rate": 1.0,
        "server-momentum": 0.9,
    }


@pytest.mark.parametrize(
    "override, match",
    [
        ({"bitz": 8}, "unknown run-config key 'bitz'"),
        ({"bits": "8"}, "bits = '8' has type str, expected int"),
        ({"bits": 1}, "bits = 1 must be 2..16, or 32"),
        ({"lr": 0}, "lr = 0.0 must be > 0"),
        ({"ema-decay": 1.0}, "ema-decay = 1.0 must be in"),
        ({"block": "channel"}, "block must be one of"),
        ({"dataset": "imagenet"}, "unknown dataset|imagenet"),
        ({"strategy.fedsgd.lr": 1.0}, "unknown strategies"),
        ({"ema": 1}, "ema = 1 has type int, expected bool"),
    ],
)
def test_bad_values_raise_config_errors_naming_the_key(override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AppConfig.from_run_config({**default_run_config(), **override})


def test_ints_are_accepted_where_floats_are_expected() -> None:
    cfg = AppConfig.from_run_config({**default_run_config(), "lr": 1, "block": 32})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.block == 32


def test_node_config_partition_and_bits() -> None:
    assert node_partition({"partition-id": 2, "num-partitions": 5}) == (2, 5)
    with pytest.raises(ConfigError, match="--node-config"):
        node_partition({})
    with pytest.raises(ConfigError, match=r"outside \[0, 2\)"):
        node_partition({"partition-id": 2, "num-partitions": 2})
    assert node_bits({}, default=8) == 8 and node_bits({"bits": 4}, default=8) == 4
    with pytest.raises(ConfigError, match="bits="):
        node_bits({"bits": 20}, default=8)
