"""The strategy registry: every name builds, bad names and parameters are named, light import."""

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.serverapp.strategy import Strategy

from fedlpt.strategy.registry import COMMON_PARAMS, STRATEGIES, build_strategy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_strategy_builds_with_its_declared_defaults(name: str) -> None:
    strategy = build_strategy(name, {**COMMON_PARAMS, **STRATEGIES[name].params})
    assert isinstance(strategy, Strategy)
    assert type(strategy).__name__ == STRATEGIES[name].flower_class


def test_unknown_strategies_and_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        build_strategy("fedsgd")
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['momentum'\]"):
        build_strategy("fedavg", {"momentum": 0.9})


def test_the_registry_imports_no_flower_strategy() -> None:
    code = "import sys, fedlpt.strategy.registry; print('flwr.serverapp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
