"""The IDX reader: plain and gzipped files read back exactly; malformed files are named."""

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlpt.data.idx import IdxError, find_idx_files, read_idx
from tests.data.idx_files import idx_bytes, write_idx


@given(
    array=hnp.arrays(
        st.sampled_from([np.uint8, np.int8]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    ),
    gz=st.booleans(),
)
def test_an_idx_file_reads_back_exactly(tmp_path_factory, array: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path_factory.mktemp("idx") / "x-idx-ubyte", array, gz=gz)
    read = read_idx(path)
    assert read.dtype == array.dtype and np.array_equal(read, array)


def test_big_endian_floats_come_back_in_native_order(tmp_path: Path) -> None:
    array = np.array([[0.5, -2.0], [3.25, 1e-3]], dtype=np.float32)
    read = read_idx(write_idx(tmp_path / "f", array))
    assert read.dtype == np.float32 and read.dtype.isnative and np.array_equal(read, array)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "IDX header"),
        (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated header"),
        (idx_bytes(np.zeros((3, 4), np.uint8))[:-1], r"\(3, 4\).*12 bytes, but 11 follow"),
        (idx_bytes(np.zeros(2, np.uint8)) + b"!", "but 3 follow"),
        (gzip.compress(idx_bytes(np.zeros(9, np.uint8)))[:-6], "gzip"),
    ],
)
def test_a_malformed_file_is_named_with_its_fault(tmp_path: Path, data: bytes, reason) -> None:
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(IdxError, match=reason):
        read_idx(path)


def test_files_are_found_plain_or_gzipped(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros(2, np.uint8))
    write_idx(tmp_path / "b", np.zeros(2, np.uint8), gz=True)
    assert find_idx_files(tmp_path, ("a", "b")) == [tmp_path / "a", tmp_path / "b.gz"]
    assert find_idx_files(tmp_path, ("a", "c")) is None
