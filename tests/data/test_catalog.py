"""The dataset catalog: one record per dataset, clear errors, a light import."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedlpt.data.catalog import DATASET_NAMES, DATASETS, dataset_info

ROOT = Path(__file__).resolve().parents[2]


def test_every_dataset_has_one_record_with_its_image_shape() -> None:
    shapes = {n: (i.in_channels, i.image_size, i.num_classes) for n, i in DATASETS.items()}
    assert shapes == {
        "digits": (1, 8, 10),
        "mnist": (1, 28, 10),
        "fmnist": (1, 28, 10),
        "cifar10": (3, 32, 10),
        "cifar100": (3, 32, 100),
    }
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.in_channels
    assert dataset_info("fmnist").debian_package == "dataset-fashion-mnist"


def test_an_unknown_dataset_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=", ".join(DATASET_NAMES)):
        dataset_info("svhn")


def test_the_catalog_imports_no_dataset_library() -> None:
    heavy = ["datasets", "flwr_datasets", "sklearn", "torchvision", "matplotlib", "torch"]
    code = f"import sys, fedlpt.data.catalog; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
