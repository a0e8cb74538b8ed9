"""Sources of images: data-dir (IDX or save_to_disk), Debian's IDX files, the hub, offline."""

import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from fedlpt.data import sources
from fedlpt.data.catalog import dataset_info
from fedlpt.data.loaders import load_centralized_test, load_partition
from fedlpt.data.sources import DatasetUnavailableError, debian_folder, load_splits
from tests.data.idx_files import write_mnist_like

FMNIST = dataset_info("fmnist")


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


@pytest.mark.parametrize("gz", [True, False])
def test_a_data_dir_of_idx_files_is_read(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_like(tmp_path, gz=gz)
    splits = load_splits(FMNIST, str(tmp_path))
    assert np.array_equal(splits.train_images, arrays["train-images-idx3-ubyte"])
    assert np.array_equal(splits.test_labels, arrays["t10k-labels-idx1-ubyte"])
    central = load_centralized_test("fmnist", batch_size=4, data_dir=tmp_path)
    first = arrays["t10k-images-idx3-ubyte"][0].astype(np.float32) / 255.0
    expected = torch.from_numpy((first - 0.2860) / 0.3530)
    assert torch.allclose(next(iter(central))[0][0, 0], expected, atol=1e-6)


def test_the_real_fashion_mnist_of_debian_is_found_from_its_file_list() -> None:
    folder = debian_folder(FMNIST)
    if folder is None:
        pytest.skip("Debian's dataset-fashion-mnist is not installed here")
    splits = load_splits(FMNIST, None)
    assert splits.train_images.shape == (60000, 28, 28)
    assert splits.test_images.shape == (10000, 28, 28)
    assert np.bincount(splits.train_labels).tolist() == [6000] * 10
    assert "dataset-fashion-mnist" in splits.origin
    assert abs(splits.train_images.mean() / 255 - FMNIST.mean[0]) < 1e-3


def test_data_dir_serves_a_grayscale_dataset_saved_to_disk(tmp_path: Path) -> None:
    splits = save_image_dataset(tmp_path, "image", "label", (28, 28))
    sizes = []
    for partition_id in range(3):
        train, _ = load_partition(
            "fmnist", partition_id, 3, alpha=0.5, seed=0, batch_size=8, data_dir=tmp_path
        )
        images, labels = next(iter(train))
        assert images.shape == (8, 1, 28, 28) and labels.dtype == torch.int64
        sizes.append(len(train.dataset))
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
        "mnist",
        0,
        1,
        partitioner="iid",
        alpha=1.0,
        seed=0,
        batch_size=8,
        data_dir=tmp_path / "single",
    )
    assert len(central.dataset) == 12
    assert len(train.dataset) == 48 and len(test.dataset) == 0


def test_a_missing_or_empty_data_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"data-dir .* is not a directory"):
        load_centralized_test("mnist", batch_size=8, data_dir=tmp_path / "absent")
    with pytest.raises(DatasetUnavailableError, match="neither IDX files nor a save_to_disk"):
        load_centralized_test("mnist", batch_size=8, data_dir=tmp_path)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty Hugging Face caches, the hub unreachable, no Debian package."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sources, "debian_folder", lambda info: None)


def assert_names_every_way_out(error: DatasetUnavailableError, name: str) -> None:
    message = str(error)
    assert repr(name) in message and "digits" in message and "data-dir" in message
    assert "IDX files" in message and "Traceback" not in message


@pytest.mark.usefixtures("offline_hub")
def test_hub_dataset_in_offline_mode_raises_dataset_unavailable(monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as raised:
        load_partition("fmnist", 0, 10, alpha=0.5, seed=0, batch_size=32)
    assert time.monotonic() - started < 10
    assert_names_every_way_out(raised.value, "fmnist")
    assert "apt-get install dataset-fashion-mnist" in str(raised.value)
    assert isinstance(raised.value.__cause__, ConnectionError)


@pytest.mark.usefixtures("offline_hub")
def test_unreachable_hub_raises_dataset_unavailable_quickly(monkeypatch) -> None:
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
        load_centralized_test("mnist", batch_size=32)
    assert time.monotonic() - started < 10
    assert_names_every_way_out(raised.value, "mnist")
    assert "unreachable" in str(raised.value)
