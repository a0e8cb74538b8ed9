"""Shared pytest settings: deterministic hypothesis profile, seeded torch, quiet Flower."""

import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from fedlpt.quant import kernels

# One intra-op thread: on a shared two-core machine torch's thread pool slows small ops
# down tens of times as soon as another process wants a core.
torch.set_num_threads(1)

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


@pytest.fixture(autouse=True)
def _eager_rounding(request: pytest.FixtureRequest) -> None:
    """Tests round eagerly (identical results, no compile per word length); a test marked
    ``compiled`` runs the compiled kernels, as applications and benchmarks do."""
    kernels.set_compiled(request.node.get_closest_marker("compiled") is not None)
