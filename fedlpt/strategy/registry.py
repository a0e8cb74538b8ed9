"""The Flower strategies a run can name, their parameters' defaults, and ``build_strategy``.

A light module: the run-config parser imports it for the names and defaults alone, and
Flower's strategy classes are imported only when a strategy is built.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..protocol import TRAIN_LOSS

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@dataclass(frozen=True)
class StrategyEntry:
    """A Flower strategy selectable by name.

    Args:
        flower_class: its class name in ``flwr.serverapp.strategy``.
        params: defaults of its own parameters (kebab-case), declared in pyproject.toml as
            ``strategy.<name>.<param>`` so that ``--run-config`` may override them.
        fixed: arguments fedlpt's protocol dictates (snake_case), not for users to set.
    """

    flower_class: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    fixed: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


STRATEGIES: Mapping[str, StrategyEntry] = MappingProxyType(
    {
        "fedavg": StrategyEntry("FedAvg"),
        "fedprox": StrategyEntry("FedProx", {"proximal-mu": 0.01}),
        "fedavgm": StrategyEntry("FedAvgM", {"server-learning-rate": 1.0, "server-momentum": 0.9}),
        "fedadam": StrategyEntry("FedAdam", {"eta": 0.01, "eta-l": 0.1, "tau": 0.001}),
        "fedyogi": StrategyEntry("FedYogi", {"eta": 0.01, "eta-l": 0.0316, "tau": 0.001}),
        "fedadagrad": StrategyEntry("FedAdagrad", {"eta": 0.01, "eta-l": 0.1, "tau": 0.001}),
        "fedmedian": StrategyEntry("FedMedian"),
        "fedtrimmedavg": StrategyEntry("FedTrimmedAvg", {"beta": 0.2}),
        "krum": StrategyEntry("Krum", {"num-malicious-nodes": 0}),
        "multikrum": StrategyEntry("MultiKrum"),
        "bulyan": StrategyEntry("Bulyan"),
        # q-FFL estimates each client's Lipschitz constant as 1 / its learning rate.
        "qfedavg": StrategyEntry(
            "QFedAvg",
            {"client-learning-rate": 0.001, "q": 0.1},
            fixed={"train_loss_key": TRAIN_LOSS},
        ),
    }
)
# How replies weigh in aggregation: FedAvg's by examples (clipped by the reply screen), or
# all alike, the paper's unweighted mean.
WEIGHTINGS = ("examples", "equal")
# Arguments every Flower strategy takes, with fedlpt's defaults: every node trains each
# round, and the server evaluates centrally instead of asking the clients.
COMMON_PARAMS: Mapping[str, Any] = MappingProxyType(
    {"fraction-train": 1.0, "fraction-evaluate": 0.0}
)


def strategy_key(name: str) -> str:
    """The registry key of ``name`` (case, ``-`` and ``_`` ignored); ValueError if unknown."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return key


def build_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Instantiate the Flower strategy ``name`` with kebab- or snake-case keyword ``params``.

    Raises:
        ValueError: an unknown strategy, or a parameter it does not take (both named,
            with what is allowed).
    """
    entry = STRATEGIES[strategy_key(name)]
    cls = getattr(importlib.import_module("flwr.serverapp.strategy"), entry.flower_class)
    accepted = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    } - set(entry.fixed)
    kwargs = {k.replace("-", "_"): v for k, v in (params or {}).items()}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"strategy {strategy_key(name)!r} has no parameter(s) {unknown}; "
            f"it accepts {sorted(accepted)}"
        )
    return cls(**kwargs, **entry.fixed)
