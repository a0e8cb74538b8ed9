"""How a train pool is divided among clients: row indices per partition, by seed.

* ``"iid"``: a random permutation cut into equal shards (as flwr-datasets'
  ``IidPartitioner`` cuts a shuffled dataset);
* ``"dirichlet"``: flwr-datasets' ``DirichletPartitioner`` (label skew; client sizes
  vary, by orders of magnitude at small alpha);
* ``"dirichlet-balanced"``: the paper's split (``data.py: split_dirichlet`` of LPT-FL):
  per class a Dirichlet(alpha) distribution over clients, the class x client matrix then
  scaled towards doubly stochastic (Sinkhorn), so that clients are equal-sized while
  their label mix stays as skewed as alpha says. Equal sizes need classes to be split
  among clients: with fewer clients than classes and a tiny alpha, whole classes go to
  one client each and sizes follow. Its flwr-datasets ``Partitioner`` is
  :class:`fedlpt.data.partitioners.BalancedDirichletPartitioner`.
"""

from __future__ import annotations

import math

import numpy as np

from .catalog import PARTITIONER_NAMES

# Every partition keeps at least this many samples so that every client has something
# to train on; see _ensure_min_partition_size for why DirichletPartitioner cannot.
MIN_PARTITION_SIZE = 1
SINKHORN_ITERATIONS = 1000  # the paper's cap
SINKHORN_TOLERANCE = 1e-9


def partition_rows(
    labels: np.ndarray, num_partitions: int, *, partitioner: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Row indices of each of ``num_partitions`` partitions of a pool with ``labels``.

    Every row lands in exactly one partition; every partition gets at least one row.

    Raises:
        ValueError: an unknown partitioner, a bad alpha, or more partitions than rows.
    """
    if partitioner not in PARTITIONER_NAMES:
        raise ValueError(f"unknown partitioner {partitioner!r}; choose one of {PARTITIONER_NAMES}")
    if num_partitions > len(labels):
        raise ValueError(
            f"num_partitions={num_partitions} exceeds the {len(labels)} training samples"
        )
    if partitioner != "iid" and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 for {partitioner!r}, got {alpha}")
    if partitioner == "iid":
        order = np.random.default_rng(seed).permutation(len(labels))
        partitions = np.array_split(order, num_partitions)
    elif partitioner == "dirichlet":
        partitions = _flower_dirichlet(labels, num_partitions, alpha, seed)
    else:
        partitions = balanced_dirichlet(labels, num_partitions, alpha, seed)
    return _ensure_min_partition_size(partitions, MIN_PARTITION_SIZE)


def class_shares(num_classes: int, num_partitions: int, alpha: float, seed: int) -> np.ndarray:
    """The paper's ``[num_classes, num_partitions]`` matrix: row c is how class c is split.

    Each row is drawn from Dirichlet(alpha), then the matrix is scaled alternately by
    columns and rows (Sinkhorn) until every row sums to 1 and every column to
    ``num_classes / num_partitions``: every client gets the same share of the pool.
    """
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([alpha] * num_partitions, size=num_classes)
    # At small alpha draws underflow to exactly 0; a floor keeps every column scalable.
    shares = np.maximum(shares, np.finfo(np.float64).tiny)
    column_target = num_classes / num_partitions
    for _ in range(SINKHORN_ITERATIONS):
        shares *= column_target / shares.sum(axis=0, keepdims=True)
        shares /= shares.sum(axis=1, keepdims=True)
        if np.abs(shares.sum(axis=0) - column_target).max() < SINKHORN_TOLERANCE:
            break
    return shares


def balanced_dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """The paper's equal-sized Dirichlet label-skew split of rows with ``labels``."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    shares = class_shares(len(classes), num_partitions, alpha, seed)
    rng = np.random.default_rng([seed, 1])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for row, label in zip(shares, classes, strict=True):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(row)[:-1] * len(members)).astype(np.int64)
        for index, piece in enumerate(np.split(members, cuts)):
            parts[index].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def _flower_dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """flwr-datasets' DirichletPartitioner over the pool's rows (today's default split)."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    # The partitioner only sees labels and pool rows, never the decoded images.
    order = np.random.default_rng(seed).permutation(len(labels))
    rows_by_label = datasets.Dataset.from_dict({"row": order, "label": labels[order]})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=0,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = rows_by_label
    return [
        np.asarray(partitioner.load_partition(index).with_format("numpy")[:]["row"])
        for index in range(num_partitions)
    ]


def _ensure_min_partition_size(partitions: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move rows from the largest partitions to those smaller than ``min_size``, deterministically.

    DirichletPartitioner can only redraw the whole assignment when a partition is too
    small, and gives up with a ValueError after 10 redraws. With few samples per
    partition and a small alpha nearly every draw leaves some partition empty (1,437
    digits into 80 partitions at alpha=0.1 fails about half the time at
    min_partition_size=1), so the partitioner runs with min_partition_size=0 and the
    few starved partitions get rows from the largest ones here.
    """
    partitions = [np.asarray(rows).copy() for rows in partitions]
    for target in range(len(partitions)):
        while len(partitions[target]) < min_size:
            donor = max(range(len(partitions)), key=lambda index: len(partitions[index]))
            if len(partitions[donor]) <= min_size:
                raise ValueError(
                    f"cannot give each of {len(partitions)} partitions {min_size} samples"
                )
            partitions[target] = np.append(partitions[target], partitions[donor][-1])
            partitions[donor] = partitions[donor][:-1]
    return partitions
