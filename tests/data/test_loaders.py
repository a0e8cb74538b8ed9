"""Loaders of partitions and of the server's test set: digits, offline, deterministic."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlpt.data.catalog import dataset_info
from fedlpt.data.loaders import (
    as_pool,
    load_centralized_test,
    load_partition,
    stratified_subsample,
)
from tests.data.idx_files import write_mnist_like

DIGITS_TRAIN_POOL = 1437
DIGITS_TEST_SET = 360


def partition_tensors(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return loader.dataset.images, loader.dataset.labels


def digits_partition(partition_id: int, num_partitions: int, **kwargs: object):
    options = {"alpha": 0.5, "seed": 0, "batch_size": 16} | kwargs
    return load_partition("digits", partition_id, num_partitions, **options)


def partition_sizes(num_partitions: int, **kwargs: object) -> list[int]:
    sizes = []
    for partition_id in range(num_partitions):
        train, test = digits_partition(partition_id, num_partitions, **kwargs)
        sizes.append(len(train.dataset) + len(test.dataset))
    return sizes


def test_digits_partitions_are_reproducible_by_seed() -> None:
    first_train, first_test = digits_partition(3, 10, seed=7, test_fraction=0.2)
    second_train, second_test = digits_partition(3, 10, seed=7, test_fraction=0.2)
    for first, second in [(first_train, second_train), (first_test, second_test)]:
        for a, b in zip(partition_tensors(first), partition_tensors(second), strict=True):
            assert torch.equal(a, b)


def test_digits_dirichlet_partitions_differ_across_seeds() -> None:
    assert partition_sizes(10, seed=0) != partition_sizes(10, seed=1)


def test_dirichlet_partitions_are_label_skewed() -> None:
    train, _ = digits_partition(0, 10, alpha=0.1, seed=0)
    label_counts = torch.bincount(partition_tensors(train)[1], minlength=10)
    # With alpha=0.1 a partition is dominated by a few labels.
    assert label_counts.max() > 0.4 * label_counts.sum()


def test_by_default_every_row_trains_and_there_is_no_local_test_split() -> None:
    sizes = []
    for partition_id in range(4):
        train, test = digits_partition(partition_id, 4)
        assert len(test.dataset) == 0 and list(test) == []
        sizes.append(len(train.dataset))
    assert sum(sizes) == DIGITS_TRAIN_POOL


def test_partition_split_keeps_one_training_sample_and_may_leave_test_empty() -> None:
    for partition_id in range(80):
        train, test = digits_partition(partition_id, 80, alpha=0.05, seed=3, test_fraction=0.5)
        size = len(train.dataset) + len(test.dataset)
        assert len(test.dataset) == min(int(np.ceil(0.5 * size)), size - 1)
        assert len(train.dataset) >= 1


def test_test_fraction_sets_the_local_test_share() -> None:
    train, test = digits_partition(0, 1, test_fraction=0.25)
    assert len(test.dataset) == int(np.ceil(0.25 * DIGITS_TRAIN_POOL))
    assert len(train.dataset) + len(test.dataset) == DIGITS_TRAIN_POOL


def test_batches_are_normalized_float_images_and_long_labels() -> None:
    train, test = digits_partition(0, 2, batch_size=32, test_fraction=0.2)
    for loader in (train, test):
        images, labels = next(iter(loader))
        assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (32,) and labels.dtype == torch.int64
    all_images = partition_tensors(train)[0]
    assert abs(all_images.mean().item()) < 0.2
    assert 0.8 < all_images.std().item() < 1.2


def test_train_loader_shuffles_reproducibly_and_test_loader_does_not() -> None:
    first_train, test = digits_partition(0, 2, seed=5, test_fraction=0.2)
    second_train, _ = digits_partition(0, 2, seed=5, test_fraction=0.2)
    reseeded_train, _ = digits_partition(0, 2, seed=5, shuffle_seed=123, test_fraction=0.2)
    first_batch = next(iter(first_train))[1]
    assert torch.equal(first_batch, next(iter(second_train))[1])
    assert not torch.equal(first_batch, next(iter(reseeded_train))[1])
    test_labels = torch.cat([labels for _, labels in test])
    assert torch.equal(test_labels, partition_tensors(test)[1])


def test_centralized_digits_test_set_is_disjoint_from_the_train_pool() -> None:
    loader = load_centralized_test("digits", batch_size=100)
    assert len(loader.dataset) == DIGITS_TEST_SET
    assert DIGITS_TRAIN_POOL + len(loader.dataset) == 1797
    images, labels = next(iter(loader))
    assert images.shape == (100, 1, 8, 8) and labels.shape == (100,)
    assert torch.bincount(partition_tensors(loader)[1]).min() >= 35  # stratified


def test_centralized_test_set_does_not_depend_on_partitioning() -> None:
    before = partition_tensors(load_centralized_test("digits", batch_size=8))[0]
    digits_partition(0, 5, seed=11)
    after = partition_tensors(load_centralized_test("digits", batch_size=8))[0]
    assert torch.equal(before, after)


def test_a_subsample_is_stratified_fixed_and_partitioned(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, train=200, test=100)
    central = load_centralized_test("fmnist", batch_size=8, data_dir=tmp_path, max_examples=30)
    assert len(central.dataset) == 30
    assert torch.bincount(partition_tensors(central)[1]).tolist() == [3] * 10
    sizes = [
        len(
            load_partition(
                "fmnist",
                i,
                4,
                alpha=1.0,
                seed=0,
                batch_size=8,
                partitioner="dirichlet-balanced",
                data_dir=tmp_path,
                max_examples=100,
            )[0].dataset
        )
        for i in range(4)
    ]
    assert sum(sizes) == 100 and max(sizes) - min(sizes) <= 10


def test_stratified_subsample_keeps_class_shares() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    rows = stratified_subsample(labels, 10, seed=1)
    assert np.bincount(labels[rows]).tolist() == [5, 3, 2]
    assert np.array_equal(rows, stratified_subsample(labels, 10, seed=1))


INFO = dataset_info("fmnist")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_integer_pixels_become_uint8_exactly(dtype) -> None:
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    pool = as_pool(images.astype(dtype), np.array([1, 2]), INFO, "train")
    assert pool.images.dtype == torch.uint8
    assert torch.equal(pool.images[:, 0].long(), torch.from_numpy(images))


@pytest.mark.parametrize(
    "images, match",
    [
        (np.full((2, 28, 28), 300, np.int64), r"integers in \[300, 300\]; pixels must be 0..255"),
        (np.full((2, 28, 28), -1, np.int64), r"integers in \[-1, -1\]"),
        (np.full((2, 28, 28), 210.0, np.float32), r"floats in \[210, 210\]; float pixels must"),
        (np.zeros((2, 28, 28), np.complex64), "dtype complex64"),
        (np.zeros((2, 27, 28), np.uint8), "shape"),
    ],
)
def test_pixels_that_are_not_images_are_refused_not_guessed(images, match) -> None:
    with pytest.raises(ValueError, match=match):
        as_pool(images, np.array([0, 1]), INFO, "train")


def test_labels_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels span \[0, 10\]"):
        as_pool(np.zeros((2, 28, 28), np.uint8), np.array([0, 10]), INFO, "train")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"partition_id": -1}, "partition_id"),
        ({"partition_id": 4}, "partition_id"),
        ({"num_partitions": 0, "partition_id": 0}, "num_partitions"),
        ({"num_partitions": 5000, "partition_id": 0}, "num_partitions"),
        ({"batch_size": 0}, "batch_size"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"max_examples": 0}, "max_examples"),
        ({"dataset": "imagenet"}, "unknown dataset"),
    ],
)
def test_load_partition_rejects_invalid_arguments(arguments: dict, message: str) -> None:
    call = {
        "dataset": "digits",
        "partition_id": 0,
        "num_partitions": 4,
        "alpha": 0.5,
        "seed": 0,
        "batch_size": 8,
    } | arguments
    with pytest.raises(ValueError, match=message):
        load_partition(**call)


def test_load_centralized_test_rejects_invalid_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        load_centralized_test("digits", batch_size=0)
