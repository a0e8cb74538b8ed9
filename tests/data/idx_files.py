"""Small IDX files written by the tests themselves."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the IDX format (uint8, int8 or big-endian float32)."""
    dtype = array.dtype if array.dtype.itemsize == 1 else np.dtype(">f4")
    header = bytes([0, 0, TYPE_CODES[dtype], array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist_like(folder: Path, train: int = 60, test: int = 20, gz: bool = True) -> dict:
    """A folder of the four MNIST-family IDX files with random 28x28 images."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(test, dtype=np.uint8) % 10,
    }
    for stem, array in arrays.items():
        write_idx(folder / stem, array, gz=gz)
    return arrays
