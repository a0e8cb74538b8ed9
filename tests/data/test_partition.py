"""Partitioners: coverage, sizes, skew and determinism, as properties."""

import itertools

import datasets
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlpt.data.partition import balanced_dirichlet, class_shares, partition_rows
from fedlpt.data.partitioners import BalancedDirichletPartitioner

# A pool like a subsample of Fashion-MNIST: 10 balanced classes.
LABELS = np.repeat(np.arange(10), 300)


def label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean entropy (bits) of the clients' label distributions."""
    entropies = []
    for rows in parts:
        counts = np.bincount(labels[rows], minlength=10)
        p = counts[counts > 0] / counts.sum()
        entropies.append(-(p * np.log2(p)).sum())
    return float(np.mean(entropies))


@given(
    clients=st.integers(10, 80),  # the paper's regime: at least as many clients as classes
    alpha=st.sampled_from([0.01, 0.04, 0.16, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_balanced_clients_are_equal_sized_and_cover_the_pool(clients, alpha, seed) -> None:
    parts = balanced_dirichlet(LABELS, clients, alpha, seed)
    rows = np.sort(np.concatenate(parts))
    assert np.array_equal(rows, np.arange(len(LABELS)))  # every row exactly once
    sizes = np.array([len(p) for p in parts])
    mean = len(LABELS) / clients
    # Within a few percent (rounding the per-class cuts costs at most one row per class).
    assert np.abs(sizes - mean).max() <= max(0.03 * mean, 10)


def test_the_class_matrix_is_doubly_stochastic_up_to_scale() -> None:
    shares = class_shares(10, 80, 0.01, seed=4)
    assert np.allclose(shares.sum(axis=1), 1.0)
    assert np.allclose(shares.sum(axis=0), 10 / 80, rtol=1e-6)


def test_label_skew_grows_as_alpha_falls() -> None:
    entropy = [
        label_entropy(LABELS, balanced_dirichlet(LABELS, 20, alpha, 4))
        for alpha in (10.0, 1.0, 0.16, 0.04, 0.01)
    ]
    assert all(a > b for a, b in itertools.pairwise(entropy)), entropy
    assert entropy[0] > 3.0 and entropy[-1] < 1.0  # near uniform vs one or two classes


def test_the_same_seed_gives_the_same_split_and_another_seed_another() -> None:
    first, again = balanced_dirichlet(LABELS, 8, 0.1, 3), balanced_dirichlet(LABELS, 8, 0.1, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = balanced_dirichlet(LABELS, 8, 0.1, 4)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("partitioner", ["dirichlet", "dirichlet-balanced", "iid"])
def test_every_partitioner_covers_the_pool_without_overlap(partitioner: str) -> None:
    parts = partition_rows(LABELS, 12, partitioner=partitioner, alpha=0.5, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= 1


def test_iid_partitions_are_equal_sized_and_see_every_class() -> None:
    parts = partition_rows(LABELS, 7, partitioner="iid", alpha=0.0, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(LABELS[p])) == 10 for p in parts)


def test_flower_dirichlet_sizes_vary_where_the_balanced_ones_do_not() -> None:
    unbalanced = partition_rows(LABELS, 20, partitioner="dirichlet", alpha=0.01, seed=4)
    balanced = partition_rows(LABELS, 20, partitioner="dirichlet-balanced", alpha=0.01, seed=4)
    spread = [max(map(len, p)) / min(map(len, p)) for p in (unbalanced, balanced)]
    assert spread[0] > 5 and spread[1] < 1.1


def test_small_alpha_with_many_partitions_leaves_no_partition_empty() -> None:
    parts = partition_rows(LABELS[:1437], 80, partitioner="dirichlet", alpha=0.05, seed=3)
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"partitioner": "shards"}, "unknown partitioner"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
    ],
)
def test_bad_partitioning_is_named(kwargs, match) -> None:
    options = {"partitioner": "dirichlet-balanced", "alpha": 0.5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition_rows(LABELS, 4, **options)
    with pytest.raises(ValueError, match="exceeds the 3000 training samples"):
        partition_rows(LABELS, 3001, partitioner="iid", alpha=1.0, seed=0)


def test_the_paper_split_plugs_into_flwr_datasets() -> None:
    dataset = datasets.Dataset.from_dict({"label": LABELS.tolist(), "x": list(range(len(LABELS)))})
    partitioner = BalancedDirichletPartitioner(num_partitions=6, alpha=0.1, seed=2)
    partitioner.dataset = dataset
    parts = [partitioner.load_partition(i) for i in range(6)]
    assert sum(len(p) for p in parts) == len(LABELS)
    expected = balanced_dirichlet(LABELS, 6, 0.1, 2)
    assert parts[0]["x"] == expected[0].tolist()
    with pytest.raises(ValueError, match="partition_id"):
        partitioner.load_partition(6)
