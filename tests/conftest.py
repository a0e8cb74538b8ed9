"""Shared pytest settings: deterministic hypothesis profile, seeded torch, quiet Flower."""

import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fedlpt",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("FEDLPT_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fedlpt")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
