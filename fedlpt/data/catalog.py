"""The datasets and partitioners a run can name: one record per dataset, no heavy imports.

The run-config parser imports this module alone; everything that reads images lives in
the other modules of :mod:`fedlpt.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTITIONER_NAMES = ("dirichlet", "dirichlet-balanced", "iid")
# The IDX files of the MNIST family, as LeCun and Zalando ship them (optionally gzipped):
# train images, train labels, test images, test labels.
MNIST_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetInfo:
    """Everything fedlpt knows about a dataset before reading a single image.

    Args:
        name: the run-config name.
        in_channels, image_size, num_classes: the samples, ``[C, S, S]`` images.
        mean, std: per-channel statistics of the training images scaled to [0, 1].
        hub_path: its Hugging Face Hub repository, or None (bundled).
        image_column, label_column: the columns of the Hub / ``save_to_disk`` copy.
        idx_files: the stems of its IDX files, when it ships as IDX files.
        debian_package: the Debian package that installs those IDX files, if any.
    """

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    idx_files: tuple[str, str, str, str] | None = None
    debian_package: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("digits", 1, 8, 10, (0.3053,), (0.3760,)),
        DatasetInfo(
            "mnist", 1, 28, 10, (0.1307,), (0.3081,), "ylecun/mnist", idx_files=MNIST_IDX_FILES
        ),
        DatasetInfo(
            "fmnist",
            1,
            28,
            10,
            (0.2860,),
            (0.3530,),
            "zalando-datasets/fashion_mnist",
            idx_files=MNIST_IDX_FILES,
            debian_package="dataset-fashion-mnist",
        ),
        DatasetInfo(
            "cifar10",
            3,
            32,
            10,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            "uoft-cs/cifar10",
            image_column="img",
        ),
        DatasetInfo(
            "cifar100",
            3,
            32,
            100,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "uoft-cs/cifar100",
            image_column="img",
            label_column="fine_label",
        ),
    )
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The record of dataset ``name``.

    Raises:
        ValueError: ``name`` is not a known dataset (the message lists them).
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}"
        ) from None
