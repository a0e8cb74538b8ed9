"""Each data test decodes and partitions from scratch, so caching cannot mask a difference."""

from collections.abc import Iterator

import pytest

from fedlpt.data import clear_caches


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    clear_caches()
    yield
    clear_caches()
