"""DataLoaders of a client's partition and of the server's test set, deterministic by seed.

Every dataset is read once per process into a compact tensor pool (uint8 pixels where the
source has them, checked on the way in); partitions are lists of pool rows computed once
per configuration, so a simulation that asks for partitions hundreds of times only pays
for indexing and normalizing the rows it uses.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .catalog import DatasetInfo, dataset_info
from .partition import partition_rows
from .sources import DatasetUnavailableError, load_splits

# Seed of the fixed subsamples (``max_examples``): independent of the run seed, so that
# every run of a configuration sees the same images.
SUBSAMPLE_SEED = 20241122


@dataclass(frozen=True)
class ImagePool:
    """All images and labels of one split: ``images[N, C, H, W]`` (uint8 or float32), ``labels[N]``.

    uint8 pixels are kept as they are (4x less memory than float) and scaled to [0, 1]
    only when rows are materialized; float pixels are already in [0, 1].
    """

    images: torch.Tensor
    labels: torch.Tensor

    def materialize(
        self, rows: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 images ``[R, C, H, W]`` and int64 labels ``[R]`` of ``rows``."""
        images = self.images if rows is None else self.images[rows]
        labels = self.labels if rows is None else self.labels[rows]
        pixels = images.float()
        if images.dtype == torch.uint8:
            pixels /= 255.0
        return (pixels - mean) / std, labels


def as_pool(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, split: str) -> ImagePool:
    """Check and lay out one split as an :class:`ImagePool` of ``info``'s image shape.

    Integer pixels must lie in [0, 255] (they become uint8); float pixels in [0, 1].
    Anything else is refused, never guessed at.

    Raises:
        ValueError: shapes, pixel values or labels do not fit ``info``.
    """
    where = f"{info.name!r} {split} images"
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] == info.in_channels != images.shape[1]:
        images = images.transpose(0, 3, 1, 2)
    expected = (info.in_channels, info.image_size, info.image_size)
    if images.shape[1:] != expected:
        raise ValueError(f"{where} have shape {images.shape[1:]}, expected {expected}")
    if images.dtype.kind in "iu":
        low, high = (int(images.min()), int(images.max())) if images.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(f"{where} are integers in [{low}, {high}]; pixels must be 0..255")
        images = images.astype(np.uint8)
    elif images.dtype.kind == "f":
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(
                f"{where} are floats in [{low:g}, {high:g}]; float pixels must lie in [0, 1] "
                "(store integer pixels as integers)"
            )
        images = images.astype(np.float32)
    else:
        raise ValueError(f"{where} have dtype {images.dtype}; pixels must be integers or floats")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{info.name!r} {split} labels have dtype {labels.dtype}, not integers")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(
            f"{info.name!r} {split} labels span [{labels.min()}, {labels.max()}], "
            f"expected [0, {info.num_classes})"
        )
    return ImagePool(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def stratified_subsample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` row indices (sorted) with each class in proportion, the same for a seed."""
    if count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = np.floor(sizes * count / len(labels)).astype(np.int64)
    # Hand the rows that flooring left over to the classes with the largest remainders.
    remainders = sizes * count / len(labels) - quotas
    for index in np.argsort(-remainders, kind="stable")[: count - quotas.sum()]:
        quotas[index] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == label), size=quota, replace=False)
        for label, quota in zip(classes, quotas, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


class _TensorPairDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset over ``images[N, C, H, W]`` and ``labels[N]`` that gathers whole batches.

    ``__getitems__`` lets the DataLoader fetch a batch with one tensor gather instead of
    ``batch_size`` single-item lookups followed by a stack.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.images[rows], self.labels[rows]


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for batches that ``_TensorPairDataset.__getitems__`` already built."""
    return batch


def _make_loader(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle_seed: int | None
) -> DataLoader:
    """DataLoader of ``(FloatTensor[B, C, H, W], LongTensor[B])``, shuffled iff ``shuffle_seed``."""
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(
        _TensorPairDataset(images, labels),
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=generator,
        collate_fn=_batch_as_is,
        num_workers=0,
    )


@functools.lru_cache(maxsize=4)
def _load_pools(name: str, data_dir: str | None) -> tuple[ImagePool, ImagePool]:
    """The (train pool, centralized test set) of dataset ``name``, read once per process."""
    info = dataset_info(name)
    splits = load_splits(info, data_dir)
    try:
        train = as_pool(splits.train_images, splits.train_labels, info, "train")
        test = as_pool(splits.test_images, splits.test_labels, info, "test")
    except ValueError as err:
        raise ValueError(f"{splits.origin}: {err}") from None
    return train, test


@functools.lru_cache(maxsize=8)
def _pool_rows(
    name: str, data_dir: str | None, split: str, max_examples: int | None
) -> torch.Tensor:
    """Rows of a split's pool in use: all, or a fixed stratified subsample."""
    train, test = _load_pools(name, data_dir)
    labels = (train if split == "train" else test).labels.numpy()
    if max_examples is None:
        return torch.arange(len(labels))
    return torch.from_numpy(stratified_subsample(labels, max_examples, SUBSAMPLE_SEED))


@functools.lru_cache(maxsize=8)
def _partition_rows(
    name: str,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
    data_dir: str | None,
    max_examples: int | None,
) -> tuple[torch.Tensor, ...]:
    """Train-pool rows of every partition (``num_partitions`` int64 tensors), computed once."""
    train_pool, _ = _load_pools(name, data_dir)
    rows = _pool_rows(name, data_dir, "train", max_examples)
    labels = train_pool.labels[rows].numpy()
    parts = partition_rows(labels, num_partitions, partitioner=partitioner, alpha=alpha, seed=seed)
    return tuple(rows[torch.from_numpy(part.astype(np.int64))] for part in parts)


def _normalization(info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, shaped ``[C, 1, 1]`` for broadcasting."""
    mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
    return mean, std


def _normalize_data_dir(data_dir: str | os.PathLike[str] | None) -> str | None:
    return None if data_dir is None else str(Path(data_dir).expanduser().resolve())


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_max_examples(max_examples: int | None) -> None:
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 (or None for all), got {max_examples}")


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    batch_size: int,
    partitioner: str = "dirichlet",
    test_fraction: float = 0.0,
    data_dir: str | os.PathLike[str] | None = None,
    shuffle_seed: int | None = None,
    max_examples: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders of one client's partition of ``dataset``'s train pool.

    Batches are ``(images: FloatTensor[B, C, H, W], labels: LongTensor[B])``, images
    normalized with the dataset's per-channel mean and std.

    Args:
        dataset: one of ``fedlpt.data.DATASET_NAMES``.
        partition_id: which partition, in ``[0, num_partitions)``.
        num_partitions: number of clients the train pool is divided among.
        alpha: Dirichlet concentration of the label skew (> 0; ``"iid"`` ignores it).
        seed: seeds the partitioning, the partition's train/test split and, unless
            ``shuffle_seed`` is given, the train loader's shuffling. Non-negative.
        batch_size: samples per batch (the last batch may be smaller).
        partitioner: ``"dirichlet"``, ``"dirichlet-balanced"`` (the paper's) or ``"iid"``.
        test_fraction: share of the partition held out for local evaluation, in [0, 1);
            0 (the default) trains on every row. At least one sample always stays in
            train, so the test loader may be empty.
        data_dir: a folder of IDX files or a ``save_to_disk`` copy to read.
        shuffle_seed: seed of the train loader's shuffling (e.g. varied per round); the
            loader's generator advances across epochs, but a new loader with the same
            seed replays the same order.
        max_examples: partition a fixed stratified subsample of this many rows of the
            train pool instead of all of it.

    Raises:
        ValueError: on out-of-range arguments or an unknown dataset.
        DatasetUnavailableError: if the dataset can neither be read nor downloaded.
    """
    dataset_info(dataset)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    _check_batch_size(batch_size)
    _check_max_examples(max_examples)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")

    directory = _normalize_data_dir(data_dir)
    rows = _partition_rows(
        dataset, num_partitions, partitioner, float(alpha), seed, directory, max_examples
    )
    partition = rows[partition_id]
    # Same rule as datasets' train_test_split (test size rounded up), but one sample
    # always stays in train.
    num_test = min(math.ceil(test_fraction * len(partition)), len(partition) - 1)
    split_rng = np.random.default_rng([seed, partition_id])
    shuffled = partition[torch.from_numpy(split_rng.permutation(len(partition)))]
    train_rows, test_rows = shuffled[num_test:], shuffled[:num_test]
    if shuffle_seed is None:
        # Distinct per partition, so that clients do not all visit batches in lockstep.
        shuffle_seed = int(np.random.SeedSequence([seed, partition_id]).generate_state(1)[0])

    info = dataset_info(dataset)
    train_pool, _ = _load_pools(dataset, directory)
    mean, std = _normalization(info)
    train_loader = _make_loader(
        *train_pool.materialize(train_rows, mean, std),
        batch_size=batch_size,
        shuffle_seed=shuffle_seed,
    )
    test_loader = _make_loader(
        *train_pool.materialize(test_rows, mean, std), batch_size=batch_size, shuffle_seed=None
    )
    return train_loader, test_loader


@functools.lru_cache(maxsize=2)
def _centralized_test_tensors(
    name: str, data_dir: str | None, max_examples: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    _, test_pool = _load_pools(name, data_dir)
    rows = _pool_rows(name, data_dir, "test", max_examples)
    return test_pool.materialize(rows, *_normalization(dataset_info(name)))


def load_centralized_test(
    dataset: str,
    *,
    batch_size: int,
    data_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
) -> DataLoader:
    """Unshuffled DataLoader over ``dataset``'s test split, for the server's evaluation.

    Batches are ``(images: FloatTensor[B, C, H, W], labels: LongTensor[B])``. The test
    split is disjoint from the train pool that ``load_partition`` divides; for digits it
    is a fixed stratified 20% (360 images) independent of the run seed. ``max_examples``
    evaluates on a fixed stratified subsample of the test split.

    Raises:
        ValueError: on an unknown dataset or ``batch_size < 1``.
        DatasetUnavailableError: if the dataset can neither be read nor downloaded.
    """
    dataset_info(dataset)
    _check_batch_size(batch_size)
    _check_max_examples(max_examples)
    images, labels = _centralized_test_tensors(dataset, _normalize_data_dir(data_dir), max_examples)
    return _make_loader(images, labels, batch_size=batch_size, shuffle_seed=None)


def clear_caches() -> None:
    """Forget the decoded datasets and partitions held by this process."""
    _centralized_test_tensors.cache_clear()
    _partition_rows.cache_clear()
    _pool_rows.cache_clear()
    _load_pools.cache_clear()


__all__ = [
    "DatasetUnavailableError",
    "ImagePool",
    "as_pool",
    "clear_caches",
    "load_centralized_test",
    "load_partition",
    "stratified_subsample",
]
