"""Federated image datasets: a catalog, sources, partitioners and loaders.

* :mod:`~fedlpt.data.catalog`: one record per dataset and the partitioner names (light:
  the run-config parser imports it alone);
* :mod:`~fedlpt.data.sources`: where images come from (``data-dir``, scikit-learn's
  digits, Debian's IDX packages, the Hugging Face Hub);
* :mod:`~fedlpt.data.idx`: the IDX file reader;
* :mod:`~fedlpt.data.partition`: how a pool is divided among clients (and
  :mod:`~fedlpt.data.partitioners`, the paper's split as a flwr-datasets Partitioner);
* :mod:`~fedlpt.data.loaders`: the DataLoaders of a client's partition and of the
  server's test set.

Names are imported lazily, so that importing the catalog loads no dataset library.
"""

from __future__ import annotations

from .._lazy import lazy_face

_HOMES = {
    "DATASETS": "catalog",
    "DATASET_NAMES": "catalog",
    "DatasetInfo": "catalog",
    "PARTITIONER_NAMES": "catalog",
    "dataset_info": "catalog",
    "DatasetUnavailableError": "sources",
    "load_splits": "sources",
    "IdxError": "idx",
    "read_idx": "idx",
    "partition_rows": "partition",
    "balanced_dirichlet": "partition",
    "BalancedDirichletPartitioner": "partitioners",
    "clear_caches": "loaders",
    "load_centralized_test": "loaders",
    "load_partition": "loaders",
}
__all__, __getattr__, __dir__ = lazy_face(__name__, _HOMES)
