"""Where a dataset's images come from, tried in order, each as NumPy arrays.

1. ``data-dir``, when given: a folder of IDX files, or a copy saved with ``datasets``'
   ``save_to_disk`` (a DatasetDict with ``train`` and ``test``, or one Dataset of which a
   fixed fifth is held out for testing).
2. ``digits``: scikit-learn's bundled 8x8 digits, offline.
3. A Debian package that installs the IDX files (``dataset-fashion-mnist``), when it is
   installed: its files are looked up in the package's own file list.
4. The Hugging Face Hub (or its local cache), after a fast reachability probe.

Heavy libraries (scikit-learn, ``datasets``) are imported only by the source that needs
them, so that a device reading IDX files installs neither.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import DatasetInfo
from .idx import IdxError, find_idx_files, read_idx

# Seed of the fixed train/test split of sources without one (digits, single-split
# folders). Independent of the run seed so that every run evaluates on the same set.
HOLDOUT_SEED = 20240601
HOLDOUT_FRACTION = 0.2
# Upper bound on the reachability probe of the Hugging Face Hub, in seconds. Without the
# probe, datasets retries for about 25 s before reporting that it has no network.
HUB_PROBE_TIMEOUT_S = 3.0
# Where Debian's packages put their IDX files, as their file lists say; used when dpkg
# itself is not available to ask.
DEBIAN_FOLDERS = {"dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


class DatasetUnavailableError(RuntimeError):
    """Raised when a dataset can neither be read locally nor downloaded."""


@dataclass(frozen=True)
class Splits:
    """A dataset's train pool and test set: images ``[N, ...]`` and integer labels ``[N]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str  # where they were read from, for messages and results


def load_splits(info: DatasetInfo, data_dir: str | None) -> Splits:
    """Read ``info``'s splits from the first source that has them (see the module doc).

    Raises:
        DatasetUnavailableError: no source has the dataset (the message names every way
            to provide it).
    """
    if data_dir is not None:
        return _folder_splits(info, Path(data_dir))
    if info.name == "digits":
        return _digits_splits()
    folder = debian_folder(info)
    if folder is not None:
        files = find_idx_files(folder, info.idx_files or ())
        if files is not None:
            return _idx_splits(files, f"Debian package {info.debian_package} ({folder})")
    if info.hub_path is None:
        raise DatasetUnavailableError(_unavailable_message(info, "it has no source"))
    return _hub_splits(info)


def debian_folder(info: DatasetInfo) -> Path | None:
    """The folder of ``info``'s IDX files from its Debian package, if installed."""
    package = info.debian_package
    if package is None:
        return None
    if shutil.which("dpkg-query"):
        listing = subprocess.run(
            ["dpkg-query", "-L", package], capture_output=True, text=True, check=False
        )
        if listing.returncode != 0:
            return None  # not installed
        stems = info.idx_files or ()
        for line in listing.stdout.splitlines():
            path = Path(line.strip())
            if stems and path.name in (f"{stems[0]}.gz", stems[0]):
                return path.parent
        return None
    folder = DEBIAN_FOLDERS.get(package)
    return folder if folder is not None and folder.is_dir() else None


def _unavailable_message(info: DatasetInfo, reason: str) -> str:
    ways = ['dataset="digits" (bundled with scikit-learn, the offline default)']
    if info.debian_package:
        ways.append(f"on Debian, `apt-get install {info.debian_package}`")
    if info.hub_path:
        ways.append(f"network access to the Hugging Face Hub ({info.hub_path})")
    files = (
        f"its IDX files ({', '.join(info.idx_files)}, optionally .gz) or " if info.idx_files else ""
    )
    ways.append(
        f"data-dir pointing to a folder of {files}a copy saved with datasets' save_to_disk "
        "(a DatasetDict with 'train' and 'test' splits)"
    )
    return f"dataset {info.name!r} is not available: {reason}. Ways out: " + "; ".join(ways) + "."


def _idx_splits(files: list[Path], origin: str) -> Splits:
    """The four IDX files of a dataset of the MNIST family."""
    try:
        arrays = [read_idx(path) for path in files]
    except (IdxError, OSError) as err:
        raise DatasetUnavailableError(f"reading {origin} failed: {err}") from None
    train_images, train_labels, test_images, test_labels = arrays
    for images, labels, split in (
        (train_images, train_labels, "train"),
        (test_images, test_labels, "test"),
    ):
        if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetUnavailableError(
                f"{origin}: {split} images {images.shape} and labels {labels.shape} disagree"
            )
    return Splits(train_images, train_labels, test_images, test_labels, origin)


def _folder_splits(info: DatasetInfo, folder: Path) -> Splits:
    """A ``data-dir``: IDX files if it holds them, else a ``save_to_disk`` copy."""
    if not folder.is_dir():
        raise DatasetUnavailableError(
            f"dataset {info.name!r} is not available: data-dir {str(folder)!r} is not a directory"
        )
    files = find_idx_files(folder, info.idx_files) if info.idx_files else None
    if files is not None:
        return _idx_splits(files, f"data-dir {folder}")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        raise DatasetUnavailableError(
            _unavailable_message(
                info, f"data-dir {str(folder)!r} holds neither IDX files nor a save_to_disk copy"
            )
        ) from None
    if isinstance(loaded, datasets.Dataset):
        images, labels = _dataset_arrays(loaded, info)
        return _held_out(images, labels, f"data-dir {folder} (one split, a fifth held out)")
    missing = {"train", "test"} - set(loaded)
    if missing:
        raise DatasetUnavailableError(
            f"data-dir {str(folder)!r} holds splits {sorted(loaded)}, but needs 'train' and 'test'"
        )
    train = _dataset_arrays(loaded["train"], info)
    test = _dataset_arrays(loaded["test"], info)
    return Splits(*train, *test, f"data-dir {folder}")


def _digits_splits() -> Splits:
    """scikit-learn's 1,797 8x8 digits: a train pool of 1,437 and a test set of 360."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # pixels are integers in [0, 16]
    return _held_out(images, bunch.target.astype(np.int64), "scikit-learn digits")


def _held_out(images: np.ndarray, labels: np.ndarray, origin: str) -> Splits:
    """A fixed stratified fifth of one split held out as the test set (rows kept in order)."""
    from sklearn.model_selection import train_test_split

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
    train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    return Splits(
        images[train_rows], labels[train_rows], images[test_rows], labels[test_rows], origin
    )


def _dataset_arrays(split: Any, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a ``datasets.Dataset`` split, decoded in chunks."""
    image_column = _find_column(split, info.image_column, ("image", "img"))
    label_column = _find_column(split, info.label_column, ("label",))
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
        raise DatasetUnavailableError(f"a split of {info.name!r} is empty")
    return np.concatenate(image_chunks), np.concatenate(label_chunks)


def _find_column(dataset: Any, preferred: str, fallbacks: tuple[str, ...]) -> str:
    for column in (preferred, *fallbacks):
        if column in dataset.column_names:
            return column
    raise DatasetUnavailableError(
        f"dataset has columns {dataset.column_names}, none of which is one of "
        f"{[preferred, *fallbacks]}"
    )


def _is_in_hf_cache(hub_path: str) -> bool:
    """Whether ``hub_path`` was downloaded before, so datasets can load it without network."""
    import datasets
    import huggingface_hub.constants

    namespace, _, repo = hub_path.rpartition("/")
    datasets_cache = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{repo}"
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{namespace}--{repo}"
    return datasets_cache.is_dir() or hub_cache.is_dir()


def _hub_unreachable_reason(timeout_s: float) -> str | None:
    """Why the Hub endpoint cannot be reached within ``timeout_s`` seconds, or None if it can.

    Runs in a daemon thread because name resolution ignores socket timeouts and can
    block far longer than ``timeout_s`` on a machine without network.
    """
    import huggingface_hub.constants

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


def _hub_splits(info: DatasetInfo) -> Splits:
    """Download (or read from the Hugging Face cache) the train/test splits of ``info``.

    Raises:
        DatasetUnavailableError: if the dataset is neither cached nor downloadable.
    """
    import datasets
    from datasets.exceptions import DatasetsError

    assert info.hub_path is not None
    # The probe is skipped when datasets can answer without network anyway (offline mode,
    # or a cached copy it falls back to), and behind a proxy, which the probe would bypass.
    probe_is_meaningful = not (
        datasets.config.HF_HUB_OFFLINE
        or _is_in_hf_cache(info.hub_path)
        or urllib.request.getproxies()
    )
    if probe_is_meaningful:
        reason = _hub_unreachable_reason(HUB_PROBE_TIMEOUT_S)
        if reason is not None:
            raise DatasetUnavailableError(
                _unavailable_message(info, f"the Hugging Face Hub is unreachable: {reason}")
            )
    try:
        splits = datasets.load_dataset(info.hub_path)
    except (OSError, DatasetsError) as error:
        # ConnectionError (including offline mode) and FileNotFoundError are OSErrors.
        # Only the first line of the cause: the chained exception keeps the details.
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DatasetUnavailableError(
            _unavailable_message(info, f"loading {info.hub_path!r} failed: {cause}")
        ) from error
    train = _dataset_arrays(splits["train"], info)
    test = _dataset_arrays(splits["test"], info)
    return Splits(*train, *test, f"Hugging Face Hub {info.hub_path}")
