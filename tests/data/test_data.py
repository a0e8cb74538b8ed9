"""Partitioning, loaders and offline behaviour of fedlpt.data, all without network."""

import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from fedlpt import data
from fedlpt.data import (
    DatasetSpec,
    DatasetUnavailableError,
    dataset_spec,
    load_centralized_test,
    load_partition,
)

DIGITS_TRAIN_POOL = 1437
DIGITS_TEST_SET = 360


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    """Each test decodes and partitions from scratch, so caching cannot mask a difference."""
    data.clear_caches()
    yield
    data.clear_caches()


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


def test_dataset_spec_describes_every_dataset() -> None:
    assert dataset_spec("digits") == DatasetSpec("digits", 1, 8, 10)
    assert dataset_spec("mnist") == DatasetSpec("mnist", 1, 28, 10)
    assert dataset_spec("fmnist") == DatasetSpec("fmnist", 1, 28, 10)
    assert dataset_spec("cifar10") == DatasetSpec("cifar10", 3, 32, 10)
    assert dataset_spec("cifar100") == DatasetSpec("cifar100", 3, 32, 100)


def test_dataset_spec_rejects_unknown_name_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match="digits, mnist, fmnist, cifar10, cifar100"):
        dataset_spec("svhn")


def test_digits_partitions_are_reproducible_by_seed() -> None:
    first_train, first_test = digits_partition(3, 10, seed=7)
    data.clear_caches()
    second_train, second_test = digits_partition(3, 10, seed=7)

    for first, second in [(first_train, second_train), (first_test, second_test)]:
        first_images, first_labels = partition_tensors(first)
        second_images, second_labels = partition_tensors(second)
        assert torch.equal(first_images, second_images)
        assert torch.equal(first_labels, second_labels)


def test_digits_dirichlet_partitions_differ_across_seeds() -> None:
    sizes_seed_0 = partition_sizes(10, seed=0)
    sizes_seed_1 = partition_sizes(10, seed=1)

    assert sizes_seed_0 != sizes_seed_1


def test_dirichlet_partitions_are_label_skewed() -> None:
    train, _ = digits_partition(0, 10, alpha=0.1, seed=0, test_fraction=0.0)

    label_counts = torch.bincount(partition_tensors(train)[1], minlength=10)

    # With alpha=0.1 a partition is dominated by a few labels.
    assert label_counts.max() > 0.4 * label_counts.sum()


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_gives_equal_sized_iid_partitions(alpha: float) -> None:
    sizes = partition_sizes(10, alpha=alpha)

    assert sum(sizes) == DIGITS_TRAIN_POOL
    assert max(sizes) - min(sizes) <= 1
    train, _ = digits_partition(0, 10, alpha=alpha, test_fraction=0.0)
    assert torch.unique(partition_tensors(train)[1]).numel() == 10


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_partitions_cover_the_train_pool_without_overlap(alpha: float) -> None:
    num_partitions = 12
    assert sum(partition_sizes(num_partitions, alpha=alpha)) == DIGITS_TRAIN_POOL

    rows = torch.cat(data._partition_rows("digits", num_partitions, alpha, 0, None))
    assert torch.equal(torch.sort(rows).values, torch.arange(DIGITS_TRAIN_POOL))


def test_small_alpha_with_many_partitions_leaves_no_partition_empty() -> None:
    # DirichletPartitioner alone leaves some of 80 digits partitions empty at alpha=0.05
    # (and raises after 10 redraws if asked for a minimum size).
    sizes = partition_sizes(80, alpha=0.05, seed=3)

    assert min(sizes) >= 1
    assert sum(sizes) == DIGITS_TRAIN_POOL


def test_partition_split_keeps_one_training_sample_and_may_leave_test_empty() -> None:
    for partition_id in range(80):
        train, test = digits_partition(partition_id, 80, alpha=0.05, seed=3, test_fraction=0.5)
        size = len(train.dataset) + len(test.dataset)
        assert len(test.dataset) == min(int(np.ceil(0.5 * size)), size - 1)
        assert len(train.dataset) >= 1

    train, test = digits_partition(0, 4, test_fraction=0.0)
    assert len(test.dataset) == 0
    assert list(test) == []


def test_test_fraction_sets_the_local_test_share() -> None:
    train, test = digits_partition(0, 1, test_fraction=0.25)

    assert len(test.dataset) == int(np.ceil(0.25 * DIGITS_TRAIN_POOL))
    assert len(train.dataset) + len(test.dataset) == DIGITS_TRAIN_POOL


def test_batches_are_normalized_float_images_and_long_labels() -> None:
    train, test = digits_partition(0, 2, batch_size=32)

    for loader in (train, test):
        images, labels = next(iter(loader))
        assert images.shape == (32, 1, 8, 8)
        assert images.dtype == torch.float32
        assert labels.shape == (32,)
        assert labels.dtype == torch.int64
    all_images = partition_tensors(train)[0]
    assert abs(all_images.mean().item()) < 0.2
    assert 0.8 < all_images.std().item() < 1.2


def test_train_loader_shuffles_reproducibly_and_test_loader_does_not() -> None:
    first_train, test = digits_partition(0, 2, seed=5)
    second_train, _ = digits_partition(0, 2, seed=5)
    reseeded_train, _ = digits_partition(0, 2, seed=5, shuffle_seed=123)

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
    assert images.shape == (100, 1, 8, 8)
    assert labels.shape == (100,)
    assert torch.bincount(partition_tensors(loader)[1]).min() >= 35  # stratified


def test_centralized_test_set_does_not_depend_on_partitioning() -> None:
    before = partition_tensors(load_centralized_test("digits", batch_size=8))[0]
    digits_partition(0, 5, seed=11)
    after = partition_tensors(load_centralized_test("digits", batch_size=8))[0]

    assert torch.equal(before, after)


def save_image_dataset(
    directory: Path, image_column: str, label_column: str, image_shape: tuple[int, ...]
) -> datasets.DatasetDict:
    """Save random uint8 images as a DatasetDict with 60 train and 20 test examples."""
    rng = np.random.default_rng(0)

    def split(size: int) -> datasets.Dataset:
        pixels = rng.integers(0, 256, size=(size, *image_shape), dtype=np.uint8)
        return datasets.Dataset.from_dict(
            {
                image_column: [Image.fromarray(image) for image in pixels],
                label_column: rng.integers(0, 10, size=size).tolist(),
            },
            features=datasets.Features(
                {image_column: datasets.Image(), label_column: datasets.Value("int64")}
            ),
        )

    splits = datasets.DatasetDict(train=split(60), test=split(20))
    splits.save_to_disk(str(directory))
    return splits


def test_data_dir_serves_a_grayscale_dataset_saved_to_disk(tmp_path: Path) -> None:
    splits = save_image_dataset(tmp_path, "image", "label", (28, 28))

    sizes = []
    for partition_id in range(3):
        train, test = load_partition(
            "fmnist", partition_id, 3, alpha=0.5, seed=0, batch_size=8, data_dir=tmp_path
        )
        images, labels = next(iter(train))
        assert images.shape == (8, 1, 28, 28) and labels.dtype == torch.int64
        sizes.append(len(train.dataset) + len(test.dataset))
    assert sum(sizes) == 60

    central = load_centralized_test("fmnist", batch_size=8, data_dir=str(tmp_path))
    first_image = np.asarray(splits["test"][0]["image"], dtype=np.float32) / 255.0
    expected = torch.from_numpy((first_image - 0.2860) / 0.3530)
    assert len(central.dataset) == 20
    assert torch.allclose(next(iter(central))[0][0, 0], expected, atol=1e-6)


def test_data_dir_serves_an_rgb_dataset_in_channels_first_layout(tmp_path: Path) -> None:
    splits = save_image_dataset(tmp_path, "img", "fine_label", (32, 32, 3))

    central = load_centralized_test("cifar100", batch_size=4, data_dir=tmp_path)

    images, labels = next(iter(central))
    assert images.shape == (4, 3, 32, 32)
    red_channel = np.asarray(splits["test"][0]["img"], dtype=np.float32)[:, :, 0] / 255.0
    expected = torch.from_numpy((red_channel - 0.5071) / 0.2673)
    assert torch.allclose(images[0, 0], expected, atol=1e-5)
    assert labels.tolist() == splits["test"]["fine_label"][:4]


def test_data_dir_without_splits_holds_out_a_fixed_fifth_for_testing(tmp_path: Path) -> None:
    splits = save_image_dataset(tmp_path / "splits", "image", "label", (28, 28))
    splits["train"].save_to_disk(str(tmp_path / "single"))

    central = load_centralized_test("mnist", batch_size=8, data_dir=tmp_path / "single")
    train, test = load_partition(
        "mnist", 0, 1, alpha=0.0, seed=0, batch_size=8, data_dir=tmp_path / "single"
    )

    assert len(central.dataset) == 12
    assert len(train.dataset) + len(test.dataset) == 48


def test_missing_data_dir_raises_dataset_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="data-dir"):
        load_centralized_test("mnist", batch_size=8, data_dir=tmp_path / "absent")


@pytest.fixture
def empty_hf_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the Hugging Face caches at an empty folder so nothing is found locally."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def assert_points_to_offline_options(error: DatasetUnavailableError, name: str) -> None:
    message = str(error)
    assert repr(name) in message
    assert "digits" in message
    assert "data-dir" in message
    assert "Traceback" not in message
    assert error.__cause__ is not None or "unreachable" in message


@pytest.mark.usefixtures("empty_hf_caches")
def test_hub_dataset_in_offline_mode_raises_dataset_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    started = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as raised:
        load_partition("mnist", 0, 10, alpha=0.5, seed=0, batch_size=32)

    assert time.monotonic() - started < 10
    assert_points_to_offline_options(raised.value, "mnist")
    assert isinstance(raised.value.__cause__, ConnectionError)


@pytest.mark.usefixtures("empty_hf_caches")
def test_unreachable_hub_raises_dataset_unavailable_quickly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Port 9 (discard) on the loopback interface refuses connections immediately.
    unreachable = "http://127.0.0.1:9"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", unreachable)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)

    started = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as raised:
        load_centralized_test("cifar10", batch_size=32)

    assert time.monotonic() - started < 10
    assert_points_to_offline_options(raised.value, "cifar10")
    assert "unreachable" in str(raised.value)


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
        ({"dataset": "imagenet"}, "unknown dataset"),
    ],
)
def test_load_partition_rejects_invalid_arguments(
    arguments: dict[str, object], message: str
) -> None:
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
