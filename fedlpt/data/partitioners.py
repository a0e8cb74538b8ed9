"""The paper's balanced split as a flwr-datasets ``Partitioner``, for Flower's ecosystem.

    from flwr_datasets import FederatedDataset
    from fedlpt.data import BalancedDirichletPartitioner

    partitioner = BalancedDirichletPartitioner(num_partitions=80, alpha=0.01, seed=4)
    fds = FederatedDataset(dataset="zalando-datasets/fashion_mnist",
                           partitioners={"train": partitioner})

fedlpt itself calls the same algorithm (:func:`fedlpt.data.partition.balanced_dirichlet`)
on its own image pools.
"""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import Partitioner

from .partition import balanced_dirichlet


class BalancedDirichletPartitioner(Partitioner):
    """Equal-sized partitions with Dirichlet(alpha) label skew, as in the paper's code.

    Args:
        num_partitions: number of clients.
        alpha: Dirichlet concentration (smaller: each client sees fewer classes).
        partition_by: the label column.
        seed: makes the split reproducible.
    """

    def __init__(
        self, num_partitions: int, alpha: float, partition_by: str = "label", seed: int = 42
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self._num_partitions = num_partitions
        self.alpha = alpha
        self.partition_by = partition_by
        self.seed = seed
        self._rows: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Partition ``partition_id`` of the assigned dataset."""
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(
                f"partition_id must be in [0, {self._num_partitions}), got {partition_id}"
            )
        if self._rows is None:
            labels = np.asarray(self.dataset[self.partition_by])
            self._rows = balanced_dirichlet(labels, self._num_partitions, self.alpha, self.seed)
        return self.dataset.select(self._rows[partition_id])
