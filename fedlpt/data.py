"""Federated image datasets: partitioned with flwr-datasets, deterministic by seed.

Every source (scikit-learn's bundled digits, a Hugging Face Hub dataset, or a copy
saved with ``save_to_disk``) is read once per process into a compact tensor pool
(uint8 pixels where the source has them). Partitions are lists of pool rows computed by
a flwr-datasets partitioner, also once per configuration, so a simulation that asks for
partitions hundreds of times only pays for indexing and normalizing the rows it uses.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import torch
from datasets.exceptions import DatasetsError
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

# Seed of the fixed train/test split of sources without one (digits, single-split
# folders). Independent of the run seed so that every run evaluates on the same set.
HOLDOUT_SEED = 20240601
HOLDOUT_FRACTION = 0.2

# Every partition keeps at least this many samples so that every client has something
# to train on; see _ensure_min_partition_size for why the partitioner cannot do it.
MIN_PARTITION_SIZE = 1

# Upper bound on the reachability probe of the Hugging Face Hub, in seconds. Without the
# probe, datasets retries for about 25 s before reporting that it has no network.
HUB_PROBE_TIMEOUT_S = 3.0


class DatasetUnavailableError(RuntimeError):
    """Raised when a dataset can neither be downloaded nor found locally."""


@dataclass(frozen=True)
class DatasetSpec:
    """Sample shape of a dataset: ``[in_channels, image_size, image_size]`` images, int labels."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int


@dataclass(frozen=True)
class _Source:
    """Where a dataset lives on the Hugging Face Hub and how its columns are called."""

    hub_path: str | None
    image_column: str
    label_column: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("digits", in_channels=1, image_size=8, num_classes=10),
        DatasetSpec("mnist", in_channels=1, image_size=28, num_classes=10),
        DatasetSpec("fmnist", in_channels=1, image_size=28, num_classes=10),
        DatasetSpec("cifar10", in_channels=3, image_size=32, num_classes=10),
        DatasetSpec("cifar100", in_channels=3, image_size=32, num_classes=100),
    )
}

# Per-channel mean and std of the training images scaled to [0, 1].
_SOURCES: dict[str, _Source] = {
    "digits": _Source(None, "image", "label", (0.3053,), (0.3760,)),
    "mnist": _Source("ylecun/mnist", "image", "label", (0.1307,), (0.3081,)),
    "fmnist": _Source("zalando-datasets/fashion_mnist", "image", "label", (0.2860,), (0.3530,)),
    "cifar10": _Source(
        "uoft-cs/cifar10", "img", "label", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": _Source(
        "uoft-cs/cifar100",
        "img",
        "fine_label",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    """Channels, image size and number of classes of the dataset called ``name``.

    Raises:
        ValueError: if ``name`` is not a known dataset.
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}"
        ) from None


@dataclass(frozen=True)
class _ImagePool:
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
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle_seed: int | None,
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


def _holdout_split(dataset: datasets.Dataset, label_column: str) -> datasets.DatasetDict:
    """Split ``dataset`` into a fixed train pool and a 20% test set, stratified when possible."""
    labels = dataset.with_format("numpy", columns=[label_column])[:][label_column]
    rows = np.arange(len(labels))
    try:
        train_rows, test_rows = train_test_split(
            rows, test_size=HOLDOUT_FRACTION, random_state=HOLDOUT_SEED, stratify=labels
        )
    except ValueError:
        # Stratification needs two samples per class and a test set with every class.
        train_rows, test_rows = train_test_split(
            rows, test_size=HOLDOUT_FRACTION, random_state=HOLDOUT_SEED
        )
    return datasets.DatasetDict(
        train=dataset.select(np.sort(train_rows)), test=dataset.select(np.sort(test_rows))
    )


def _digits_splits() -> datasets.DatasetDict:
    """scikit-learn's 1,797 8x8 digits as ``datasets`` splits: train (1,437), test (360)."""
    bunch = load_digits()
    # Pixel values are integers in [0, 16].
    images = (bunch.images / 16.0).astype(np.float32)
    features = datasets.Features(
        image=datasets.Array2D(shape=(8, 8), dtype="float32"),
        label=datasets.ClassLabel(names=[str(digit) for digit in range(10)]),
    )
    digits = datasets.Dataset.from_dict(
        {"image": images, "label": bunch.target.astype(np.int64)}, features=features
    )
    return _holdout_split(digits, "label")


def _unavailable_message(name: str, reason: str) -> str:
    return (
        f"dataset {name!r} is not available: {reason}. To run offline, use "
        'dataset="digits" (bundled with scikit-learn, the offline default) or pass '
        "data-dir pointing to a copy saved with datasets' save_to_disk (a DatasetDict "
        "with 'train' and 'test' splits)."
    )


def _is_in_hf_cache(hub_path: str) -> bool:
    """Whether ``hub_path`` has been downloaded before, so datasets can load it without network."""
    namespace, _, repo = hub_path.rpartition("/")
    datasets_cache = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{repo}"
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{namespace}--{repo}"
    return datasets_cache.is_dir() or hub_cache.is_dir()


def _hub_unreachable_reason(timeout_s: float) -> str | None:
    """Why the Hub endpoint cannot be reached within ``timeout_s`` seconds, or None if it can.

    Runs in a daemon thread because name resolution ignores socket timeouts and can
    block far longer than ``timeout_s`` on a machine without network.
    """
    endpoint = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    host = endpoint.hostname or ""
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as error:
            outcome.append(f"cannot connect to {host}:{port} ({error})")

    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    return outcome[0]


def _hub_splits(name: str, hub_path: str) -> datasets.DatasetDict:
    """Download (or read from the Hugging Face cache) the train/test splits of ``hub_path``.

    Raises:
        DatasetUnavailableError: if the dataset is neither cached nor downloadable.
    """
    # The probe is skipped when datasets can answer without network anyway (offline mode,
    # or a cached copy it falls back to), and behind a proxy, which the probe would bypass.
    probe_is_meaningful = not (
        datasets.config.HF_HUB_OFFLINE or _is_in_hf_cache(hub_path) or urllib.request.getproxies()
    )
    if probe_is_meaningful:
        reason = _hub_unreachable_reason(HUB_PROBE_TIMEOUT_S)
        if reason is not None:
            raise DatasetUnavailableError(
                _unavailable_message(name, f"the Hugging Face Hub is unreachable: {reason}")
            )
    try:
        splits = datasets.load_dataset(hub_path)
    except (OSError, DatasetsError) as error:
        # ConnectionError (including offline mode) and FileNotFoundError are OSErrors.
        # Only the first line of the cause: the chained exception keeps the details.
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DatasetUnavailableError(
            _unavailable_message(name, f"loading {hub_path!r} failed: {cause}")
        ) from error
    return splits


def _disk_splits(name: str, data_dir: str) -> datasets.Dataset | datasets.DatasetDict:
    """Train/test splits saved with ``save_to_disk``; a single saved Dataset is held out 80/20."""
    if not Path(data_dir).is_dir():
        raise DatasetUnavailableError(
            f"dataset {name!r} is not available: data-dir {data_dir!r} is not a directory"
        )
    loaded = datasets.load_from_disk(data_dir)
    if isinstance(loaded, datasets.Dataset):
        return loaded
    missing = {"train", "test"} - set(loaded)
    if missing:
        raise ValueError(
            f"data-dir {data_dir!r} holds splits {sorted(loaded)}, but needs 'train' and 'test'"
        )
    return loaded


def _find_column(dataset: datasets.Dataset, preferred: str, fallbacks: tuple[str, ...]) -> str:
    for column in (preferred, *fallbacks):
        if column in dataset.column_names:
            return column
    raise ValueError(
        f"dataset has columns {dataset.column_names}, none of which is one of "
        f"{[preferred, *fallbacks]}"
    )


def _to_pool(split: datasets.Dataset, spec: DatasetSpec, source: _Source) -> _ImagePool:
    """Decode every image of ``split`` once into an ``_ImagePool`` of ``spec``'s shape."""
    image_column = _find_column(split, source.image_column, ("image", "img"))
    label_column = _find_column(split, source.label_column, ("label",))
    as_numpy = split.with_format("numpy", columns=[image_column, label_column])
    image_chunks: list[np.ndarray] = []
    label_chunks: list[np.ndarray] = []
    # Chunked decoding bounds the peak memory of the intermediate per-image arrays.
    for batch in as_numpy.iter(batch_size=8192):
        images = batch[image_column]
        if images.dtype == object:
            images = np.stack(list(images))
        image_chunks.append(images)
        label_chunks.append(np.asarray(batch[label_column]))
    if not image_chunks:
        raise ValueError(f"the {spec.name!r} split is empty")
    images = np.concatenate(image_chunks)
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] == spec.in_channels != images.shape[1]:
        images = images.transpose(0, 3, 1, 2)
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    if images.shape[1:] != expected:
        raise ValueError(f"{spec.name!r} images have shape {images.shape[1:]}, expected {expected}")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    labels = np.concatenate(label_chunks).astype(np.int64)
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise ValueError(
            f"{spec.name!r} labels span [{labels.min()}, {labels.max()}], "
            f"expected [0, {spec.num_classes})"
        )
    return _ImagePool(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


@functools.lru_cache(maxsize=4)
def _load_pools(name: str, data_dir: str | None) -> tuple[_ImagePool, _ImagePool]:
    """The (train pool, centralized test set) of dataset ``name``, decoded once per process."""
    spec = dataset_spec(name)
    source = _SOURCES[name]
    if data_dir is not None:
        splits = _disk_splits(name, data_dir)
    elif source.hub_path is None:
        splits = _digits_splits()
    else:
        splits = _hub_splits(name, source.hub_path)
    if isinstance(splits, datasets.Dataset):
        splits = _holdout_split(splits, _find_column(splits, source.label_column, ("label",)))
    return _to_pool(splits["train"], spec, source), _to_pool(splits["test"], spec, source)


def _normalization(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of dataset ``name``, shaped ``[C, 1, 1]`` for broadcasting."""
    source = _SOURCES[name]
    mean = torch.tensor(source.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(source.std, dtype=torch.float32).view(-1, 1, 1)
    return mean, std


def _ensure_min_partition_size(partitions: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move rows from the largest partitions to those smaller than ``min_size``, deterministically.

    DirichletPartitioner can only redraw the whole assignment when a partition is too
    small, and gives up with a ValueError after 10 redraws. With few samples per
    partition and a small alpha nearly every draw leaves some partition empty (1,437
    digits into 80 partitions at alpha=0.1 fails about half the time at
    min_partition_size=1), so the partitioner runs with min_partition_size=0 and the
    few starved partitions get rows from the largest ones here.
    """
    partitions = [rows.copy() for rows in partitions]
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


def _make_partitioner(num_partitions: int, alpha: float, seed: int) -> Partitioner:
    if alpha <= 0:
        return IidPartitioner(num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=0,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


@functools.lru_cache(maxsize=8)
def _partition_rows(
    name: str, num_partitions: int, alpha: float, seed: int, data_dir: str | None
) -> tuple[torch.Tensor, ...]:
    """Train-pool rows of every partition (``num_partitions`` int64 tensors), computed once."""
    train_pool, _ = _load_pools(name, data_dir)
    labels = train_pool.labels.numpy()
    if num_partitions > len(labels):
        raise ValueError(
            f"num_partitions={num_partitions} exceeds the {len(labels)} training samples "
            f"of {name!r}"
        )
    # IidPartitioner takes contiguous shards, so the pool order must be random; the
    # partitioner only sees labels and pool rows, never the decoded images.
    order = np.random.default_rng(seed).permutation(len(labels))
    rows_by_label = datasets.Dataset.from_dict({"row": order, "label": labels[order]})
    partitioner = _make_partitioner(num_partitions, alpha, seed)
    partitioner.dataset = rows_by_label
    partitions = [
        np.asarray(partitioner.load_partition(index).with_format("numpy")[:]["row"])
        for index in range(num_partitions)
    ]
    partitions = _ensure_min_partition_size(partitions, MIN_PARTITION_SIZE)
    return tuple(torch.from_numpy(rows.astype(np.int64)) for rows in partitions)


def _normalize_data_dir(data_dir: str | os.PathLike[str] | None) -> str | None:
    return None if data_dir is None else str(Path(data_dir).expanduser().resolve())


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    batch_size: int,
    test_fraction: float = 0.2,
    data_dir: str | os.PathLike[str] | None = None,
    shuffle_seed: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders of one client's partition of ``dataset``'s train pool.

    Batches are ``(images: FloatTensor[B, C, H, W], labels: LongTensor[B])``, images
    normalized with the dataset's per-channel mean and std.

    Args:
        dataset: one of ``"digits"``, ``"mnist"``, ``"fmnist"``, ``"cifar10"``, ``"cifar100"``.
        partition_id: which partition, in ``[0, num_partitions)``.
        num_partitions: number of clients the train pool is divided among.
        alpha: Dirichlet concentration of the label skew; ``alpha <= 0`` means IID.
        seed: seeds the partitioning, the partition's train/test split and, unless
            ``shuffle_seed`` is given, the train loader's shuffling. Non-negative.
        batch_size: samples per batch (the last batch may be smaller).
        test_fraction: share of the partition held out for local evaluation, in [0, 1).
            At least one sample always stays in train, so the test loader may be empty.
        data_dir: a dataset saved with ``save_to_disk`` to read instead of downloading.
        shuffle_seed: seed of the train loader's shuffling (e.g. varied per round); the
            loader's generator advances across epochs, but a new loader with the same
            seed replays the same order.

    Raises:
        ValueError: on out-of-range arguments or an unknown dataset.
        DatasetUnavailableError: if the dataset can neither be downloaded nor read.
    """
    dataset_spec(dataset)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    _check_batch_size(batch_size)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")

    directory = _normalize_data_dir(data_dir)
    # Every non-positive alpha is the same IID partitioning: share one cache entry.
    partitioning_alpha = max(float(alpha), 0.0)
    rows = _partition_rows(dataset, num_partitions, partitioning_alpha, seed, directory)
    partition_rows = rows[partition_id]
    # Same rule as datasets' train_test_split (test size rounded up), but one sample
    # always stays in train.
    num_test = min(math.ceil(test_fraction * len(partition_rows)), len(partition_rows) - 1)
    split_rng = np.random.default_rng([seed, partition_id])
    shuffled = partition_rows[torch.from_numpy(split_rng.permutation(len(partition_rows)))]
    train_rows, test_rows = shuffled[num_test:], shuffled[:num_test]
    if shuffle_seed is None:
        # Distinct per partition, so that clients do not all visit batches in lockstep.
        shuffle_seed = int(np.random.SeedSequence([seed, partition_id]).generate_state(1)[0])

    train_pool, _ = _load_pools(dataset, directory)
    mean, std = _normalization(dataset)
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
def _centralized_test_tensors(name: str, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    _, test_pool = _load_pools(name, data_dir)
    return test_pool.materialize(None, *_normalization(name))


def load_centralized_test(
    dataset: str,
    *,
    batch_size: int,
    data_dir: str | os.PathLike[str] | None = None,
) -> DataLoader:
    """Unshuffled DataLoader over ``dataset``'s test split, for the server's evaluation.

    Batches are ``(images: FloatTensor[B, C, H, W], labels: LongTensor[B])``. The test
    split is disjoint from the train pool that ``load_partition`` divides; for digits it
    is a fixed stratified 20% (360 images) independent of the run seed.

    Raises:
        ValueError: on an unknown dataset or ``batch_size < 1``.
        DatasetUnavailableError: if the dataset can neither be downloaded nor read.
    """
    dataset_spec(dataset)
    _check_batch_size(batch_size)
    images, labels = _centralized_test_tensors(dataset, _normalize_data_dir(data_dir))
    return _make_loader(images, labels, batch_size=batch_size, shuffle_seed=None)


def clear_caches() -> None:
    """Forget the decoded datasets and partitions held by this process."""
    _centralized_test_tensors.cache_clear()
    _partition_rows.cache_clear()
    _load_pools.cache_clear()
