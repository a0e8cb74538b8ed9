"""The run configuration: kebab-case keys of ``[tool.flwr.app.config]``, read and checked once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from .data import dataset_spec
from .models import build_model
from .quant import BFP
from .quant.bfp import check_block
from .strategy import STRATEGIES

STRATEGY_PREFIX = "strategy."


class ConfigError(ValueError):
    """A run-config or node-config value that fedlpt cannot use; names the key."""


@dataclass(frozen=True)
class AppConfig:
    """Every run-config key fedlpt reads (kebab-case in TOML, snake_case here)."""

    num_server_rounds: int = 100
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "convnet"
    alpha: float = 0.3
    seed: int = 4
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    bits: int = 8
    block: str | int = "row"
    rounding: str = "stochastic"
    quantize_optimizer_state: bool = False
    downlink_bits: int = 32
    ema: bool = True
    ema_decay: float = 0.9
    ema_start: int = 1
    results_dir: str = "results"
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Read a Flower run config; unknown keys and wrong types raise ConfigError."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        params: dict[str, Any] = {}
        per_strategy: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            if key.startswith(STRATEGY_PREFIX):
                name = key[len(STRATEGY_PREFIX) :]
                if name == "name":
                    values["strategy"] = value
                elif "." in name:  # strategy.<strategy>.<param>: only for that strategy
                    owner, param = name.split(".", 1)
                    per_strategy.setdefault(owner, {})[param] = value
                else:
                    params[name] = value
                continue
            attr = key.replace("-", "_")
            if attr not in known or attr in ("strategy", "strategy_params"):
                raise ConfigError(
                    f"unknown run-config key {key!r}; known keys: "
                    f"{sorted(k.replace('_', '-') for k in known if k != 'strategy_params')}"
                )
            values[attr] = _coerce(key, value, known[attr].default)
        unknown = sorted(set(per_strategy) - set(STRATEGIES))
        if unknown:
            raise ConfigError(
                f"run-config has parameters for unknown strategies {unknown}; "
                f"known: {sorted(STRATEGIES)}"
            )
        chosen = str(values.get("strategy", cls.strategy)).lower()
        values["strategy_params"] = {**params, **per_strategy.get(chosen, {})}
        if values.get("data_dir") in ("", None):
            values["data_dir"] = None
        block = values.get("block", cls.block)
        if isinstance(block, str) and block.isdigit():
            values["block"] = int(block)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value cannot be used."""
        checks = [
            ("num-server-rounds", self.num_server_rounds >= 1, "must be >= 1"),
            ("local-epochs", self.local_epochs >= 1, "must be >= 1"),
            ("batch-size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("bits", self.bits == 32 or 2 <= self.bits <= 16, "must be 2..16, or 32 for FP32"),
            (
                "downlink-bits",
                self.downlink_bits == 32 or 2 <= self.downlink_bits <= 16,
                "must be 2..16, or 32 for an FP32 downlink",
            ),
            ("ema-decay", 0.0 <= self.ema_decay < 1.0, "must be in [0, 1)"),
            ("ema-start", self.ema_start >= 1, "must be >= 1"),
            ("rounding", self.rounding in ("nearest", "stochastic"), "must be nearest|stochastic"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(
                    f"run-config {key} = {getattr(self, key.replace('-', '_'))!r} {why}"
                )
        try:
            check_block(self.block)
            dataset_spec(self.dataset)
        except ValueError as err:
            raise ConfigError(f"run-config: {err}") from None

    def upload_format(self, bits: int | None = None) -> BFP | None:
        """The upload format for ``bits`` (default: the run's), None for FP32."""
        bits = self.bits if bits is None else bits
        return None if bits == 32 else BFP(bits, self.block, self.rounding)  # type: ignore[arg-type]

    def downlink_format(self) -> BFP | None:
        """The downlink format, None for FP32."""
        if self.downlink_bits == 32:
            return None
        return BFP(self.downlink_bits, self.block, self.rounding)  # type: ignore[arg-type]

    def build_model(self) -> nn.Module:
        """A fresh model for this run's dataset."""
        spec = dataset_spec(self.dataset)
        return build_model(self.model, spec.in_channels, spec.image_size, spec.num_classes)


# Declared in pyproject.toml so that `--run-config` / `-c` may override them (Flower only
# accepts keys it knows); a strategy receives the common keys plus its own sub-table.
DEFAULT_STRATEGY_PARAMS: dict[str, Any] = {
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "fedprox.proximal-mu": 0.01,
    "fedavgm.server-learning-rate": 1.0,
    "fedavgm.server-momentum": 0.9,
    "fedadam.eta": 0.01,
    "fedadam.eta-l": 0.1,
    "fedadam.tau": 0.001,
    "fedyogi.eta": 0.01,
    "fedyogi.eta-l": 0.0316,
    "fedyogi.tau": 0.001,
    "fedadagrad.eta": 0.01,
    "fedadagrad.eta-l": 0.1,
    "fedadagrad.tau": 0.001,
    "fedtrimmedavg.beta": 0.2,
    "krum.num-malicious-nodes": 0,
}


def default_run_config() -> dict[str, Any]:
    """The defaults as a flat Flower run config (what ``pyproject.toml`` declares)."""
    config: dict[str, Any] = {}
    for f in fields(AppConfig):
        if f.name in ("strategy", "strategy_params"):
            continue
        value = f.default
        config[f.name.replace("_", "-")] = "" if value is None else value
    config["strategy.name"] = AppConfig.strategy
    config.update({STRATEGY_PREFIX + k: v for k, v in DEFAULT_STRATEGY_PARAMS.items()})
    return config


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a run-config value against the default's type (ints are accepted as floats)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif default is None or isinstance(default, str):
        if isinstance(value, str):
            return value
        if key == "block" and isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ConfigError(
        f"run-config {key} = {value!r} has type {type(value).__name__}, "
        f"expected {type(default).__name__ if default is not None else 'str'}"
    )


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of this node, checked."""
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as err:
        raise ConfigError(
            f"node config has no {err.args[0]!r}: start the SuperNode with "
            '--node-config "partition-id=0 num-partitions=N"'
        ) from None
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config partition-id={partition_id} is outside [0, {num_partitions})"
        )
    return partition_id, num_partitions


def node_bits(node_config: Mapping[str, Any], default: int) -> int:
    """This node's upload bit width: ``bits`` in its node config overrides ``default``."""
    if "bits" not in node_config:
        return default
    bits = node_config["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == 32 or 2 <= bits <= 16):
        raise ConfigError(f"node config bits={bits!r} must be an int in 2..16, or 32 for FP32")
    return bits
