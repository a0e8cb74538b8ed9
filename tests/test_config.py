"""Run config: pyproject defaults, presets, overrides, errors that name the key, light imports."""

import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedlpt.config import (
    MODEL_NAMES,
    OPTIMIZER_NAMES,
    AppConfig,
    ConfigError,
    NodeConfig,
    available_presets,
    default_run_config,
    describe_keys,
    keys_markdown,
)
from fedlpt.models import build_model
from fedlpt.task import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def parse(**overrides: object) -> AppConfig:
    return AppConfig.from_run_config({**default_run_config(), **overrides})


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
    cfg = parse(**{"strategy.name": "fedavgm"})
    assert cfg.strategy_params == {
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "server-learning-rate": 1.0,
        "server-momentum": 0.9,
    }
    assert parse(**{"strategy.name": "FedAvgM"}).strategy == "fedavgm"


@pytest.mark.parametrize(
    "override, match",
    [
        ({"bitz": 8}, "unknown run-config key 'bitz'"),
        ({"bits": "8"}, "bits = '8' has type str, expected int"),
        ({"bits": 1}, "bits = 1 must be 2..16, or 32"),
        ({"learning-rate": 0}, "learning-rate = 0.0 must be a finite number > 0"),
        ({"ema-decay": 1.0}, r"ema-decay = 1.0 must be in \[0, 1\)"),
        ({"block": "channel"}, "block = 'channel' must be 'tensor', 'row', 'kernel'"),
        ({"dataset": "imagenet"}, "dataset = 'imagenet' must be one of"),
        ({"strategy.fedsgd.lr": 1.0}, "no strategy 'fedsgd'"),
        ({"strategy.name": "fedsgd"}, "unknown strategy 'fedsgd'"),
        ({"ema": 1}, "ema = 1 has type int, expected bool"),
        ({"optimizer": "lamb"}, "optimizer = 'lamb' must be one of \\['adam', 'sgd'\\]"),
        ({"model": "vgg"}, "model = 'vgg' must be one of"),
        ({"seed": -1}, "seed = -1 must be >= 0"),
        ({"alpha": math.nan}, "alpha = nan must be a finite number"),
        ({"alpha": 0.0}, "alpha = 0.0 must be > 0 for partitioner 'dirichlet'"),
        ({"momentum": -3.0}, "momentum = -3.0 must be a finite number >= 0"),
        ({"device": "tpu"}, "device = 'tpu' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        ({"partitioner": "shards"}, "partitioner = 'shards' must be one of"),
        ({"upload-rounding": "floor"}, "upload-rounding = 'floor' must be one of"),
        ({"downlink-block": "channel"}, "downlink-block = 'channel' must be 'tensor', 'row'"),
        ({"engine": "fast"}, r"engine = 'fast' must be one of \['auto', 'integer', 'emulated'\]"),
        (
            {"engine": "integer", "block": "kernel"},
            "engine = 'integer' cannot run this recipe: weight block 'kernel' puts exponents",
        ),
        ({"engine": "integer", "bits": 16}, "activation bits 16 > 8"),
        ({"engine": "integer", "weight-bits": 32}, "the weights are FP32"),
    ],
)
def test_bad_values_raise_config_errors_naming_the_key(override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse(**override)


def test_ints_are_accepted_where_floats_are_expected_and_blocks_as_ints() -> None:
    cfg = parse(**{"learning-rate": 1, "block": 32})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.block_kind == 32 and parse(block="32").block_kind == 32


def test_the_uploads_and_downlinks_format_default_to_trainings() -> None:
    cfg = parse(block="kernel", rounding="nearest")
    assert (cfg.upload_block_kind, cfg.upload_rounding_kind) == ("kernel", "nearest")
    assert cfg.downlink_block_kind == "kernel"
    cfg = parse(**{"upload-block": 16, "upload-rounding": "nearest", "downlink-block": "row"})
    assert (cfg.upload_block_kind, cfg.upload_rounding_kind) == (16, "nearest")
    assert (cfg.block_kind, cfg.rounding, cfg.downlink_block_kind) == ("row", "stochastic", "row")


def test_the_old_lr_key_is_a_deprecated_alias() -> None:
    with pytest.warns(FutureWarning, match="'lr' is deprecated; use 'learning-rate'"):
        cfg = AppConfig.from_run_config({"lr": 0.01})
    assert cfg.learning_rate == 0.01


def test_iid_ignores_alpha_and_client_evaluation_follows_fraction_evaluate() -> None:
    assert parse(partitioner="iid", alpha=0.0).partitioner == "iid"
    assert not parse().client_evaluation
    assert parse(**{"strategy.fraction-evaluate": 0.5}).client_evaluation


def test_every_model_and_optimizer_name_the_config_allows_can_be_built() -> None:
    for name in MODEL_NAMES:
        build_model(name, 1, 28, 10)
    model = build_model("mlp", 1, 8, 10)
    for name in OPTIMIZER_NAMES:
        make_optimizer(name, model.parameters(), lr=0.1)


def test_every_key_is_documented_once() -> None:
    keys = [key for key, _, _ in describe_keys()]
    assert len(keys) == len(set(keys))
    assert set(keys) == {k for k in default_run_config() if not k.startswith("strategy.")}
    assert all(help_text for _, _, help_text in describe_keys())


def test_node_config_partition_and_bits() -> None:
    node = NodeConfig.from_node_config({"partition-id": 2, "num-partitions": 5})
    assert (node.partition_id, node.num_partitions, node.bits) == (2, 5, None)
    assert (
        NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1, "bits": 4}).bits == 4
    )
    with pytest.raises(ConfigError, match="--node-config"):
        NodeConfig.from_node_config({})
    with pytest.raises(ConfigError, match=r"outside \[0, 2\)"):
        NodeConfig.from_node_config({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match=r"node config bits must be in 2\.\.16 or 32"):
        NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1, "bits": 20})
    with pytest.raises(ConfigError, match=r"unknown keys \['bit'\]"):
        NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1, "bit": 4})
    with pytest.raises(ConfigError, match="must be an int"):
        NodeConfig.from_node_config({"partition-id": "0", "num-partitions": 1})


def test_importing_the_config_loads_no_dataset_model_or_plotting_stack() -> None:
    heavy = ["datasets", "sklearn", "torchvision", "matplotlib", "flwr_datasets"]
    code = f"import sys, fedlpt.config; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_preset_applies_and_keys_set_on_purpose_win() -> None:
    cfg = parse(preset="paper-fmnist", **{"num-server-rounds": 5})
    assert (cfg.dataset, cfg.alpha, cfg.num_server_rounds) == ("fmnist", 0.01, 5)
    assert cfg.strategy_params["fraction-train"] == 0.4
    assert parse(preset="fp32").bits == 32 and not parse(preset="fp32").ema


def test_an_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"preset = 'papr' is not a preset; available: \[.*'fp32'"
    ):
        parse(preset="papr")
    assert "paper-fmnist" in available_presets()


def test_the_documented_key_table_is_the_one_the_code_generates() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented == keys_markdown(), "run: python -m fedlpt.config > docs/configuration.md"
