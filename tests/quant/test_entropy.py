"""zstd coding of packed codes: lossless, and a decoder no frame can make allocate more
than the size the manifest implies."""

import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlpt.quant import BFP
from fedlpt.quant.entropy import (
    CompressionUnavailableError,
    compress,
    decompress,
    zstd_available,
    zstd_bound,
)
from fedlpt.quant.wire import MANTISSAS_KEY, PayloadError, decode_arrays, encode_arrays

zstandard = pytest.importorskip("zstandard")


def frame(data: bytes, **options: object) -> np.ndarray:
    return np.frombuffer(zstandard.ZstdCompressor(**options).compress(data), dtype=np.uint8)


@given(st.binary(max_size=5000))
def test_compress_then_decompress_returns_the_bytes(data: bytes) -> None:
    array = np.frombuffer(data, dtype=np.uint8)
    packed = compress(array, "zstd")
    assert packed.size <= zstd_bound(array.size)
    np.testing.assert_array_equal(decompress(packed, "zstd", array.size), array)


def test_none_passes_bytes_through_and_checks_their_size() -> None:
    data = np.arange(10, dtype=np.uint8)
    assert compress(data, "none") is data
    with pytest.raises(ValueError, match="11 were expected"):
        decompress(data, "none", 11)


@pytest.mark.parametrize(
    "make, size, match",
    [
        (lambda d: frame(d), 999, "declares 1000 bytes, 999 bytes expected"),  # bomb: bigger
        (lambda d: frame(d), 1001, "declares 1000 bytes, 1001 bytes expected"),
        (lambda d: frame(d, write_content_size=False), 1000, "declares no size"),
        (lambda d: np.concatenate([frame(d), frame(d)]), 1000, "followed by"),
        (lambda d: np.concatenate([frame(d), np.zeros(3, np.uint8)]), 1000, "followed by 3"),
        (lambda d: frame(d)[:-2], 1000, "past|truncated|does not decode"),
        (lambda d: np.zeros(2000, np.uint8), 1000, "worst case"),
        (lambda d: np.frombuffer(b"not zstd at all", np.uint8), 1000, "not a zstd frame"),
    ],
)
def test_malformed_frames_are_refused_naming_the_problem(make, size: int, match: str) -> None:
    data = bytes(range(256)) * 3 + bytes(232)  # 1000 bytes, partly compressible
    with pytest.raises(ValueError, match=match):
        decompress(make(data), "zstd", size)


def test_a_bomb_declaring_the_expected_size_cannot_decode_to_more() -> None:
    # A gigabyte of zeros compresses to a few kB; declared as 1000 bytes it is refused
    # without decoding past the 1000-byte buffer.
    big = frame(bytes(1 << 24))
    with pytest.raises(ValueError):
        decompress(big, "zstd", 1000)


def test_a_corrupted_block_is_refused() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 8, 20_000).astype(np.uint8).tobytes()
    packed = frame(data, write_checksum=True).copy()
    packed[len(packed) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        decompress(packed, "zstd", len(data))


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        compress(np.zeros(1, np.uint8), "lzma")


def trained_like_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # Heavy-tailed values: most codes sit near zero, as in a trained network.
    return {
        "w": torch.randn(64, 300, generator=gen) ** 3,
        "b": torch.randn(64, generator=gen),
        "steps": torch.tensor(3),
    }


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_zstd_records_decode_to_exactly_the_plain_records_values(bits: int) -> None:
    state, fmt = trained_like_state(), BFP(bits, "row")
    plain = encode_arrays(state, fmt, torch.Generator().manual_seed(1))
    packed = encode_arrays(state, fmt, torch.Generator().manual_seed(1), compression="zstd")
    assert len(packed[MANTISSAS_KEY].data) < len(plain[MANTISSAS_KEY].data)
    expected, decoded = decode_arrays(plain), decode_arrays(packed)
    assert all(torch.equal(expected[k], decoded[k]) for k in state)


def test_a_frame_replaced_by_one_of_another_size_is_a_payload_error() -> None:
    state = trained_like_state()
    record = encode_arrays(state, BFP(8, "row"), compression="zstd")
    other = encode_arrays({**state, "w": state["w"][:32]}, BFP(8, "row"), compression="zstd")
    record[MANTISSAS_KEY] = other[MANTISSAS_KEY]
    with pytest.raises(PayloadError, match="mantissas: zstd frame declares"):
        decode_arrays(record)


def test_without_zstandard_encoding_names_the_extra_and_decoding_drops(monkeypatch) -> None:
    record = encode_arrays(trained_like_state(), BFP(8, "row"), compression="zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import now raises ImportError
    assert not zstd_available()
    with pytest.raises(CompressionUnavailableError, match=r'pip install "fedlpt\[compress\]"'):
        encode_arrays(trained_like_state(), BFP(8, "row"), compression="zstd")
    with pytest.raises(PayloadError, match="needs the zstandard library"):
        decode_arrays(record)
    plain = encode_arrays(trained_like_state(), BFP(8, "row"))  # the default needs nothing
    assert set(decode_arrays(plain)) == {"w", "b", "steps"}


def test_incompressible_codes_are_sent_uncompressed_in_the_version_1_format() -> None:
    uniform = {"w": torch.rand(64, 300, generator=torch.Generator().manual_seed(0)) - 0.5}
    fmt = BFP(8, "tensor", "nearest")
    record, plain = encode_arrays(uniform, fmt, compression="zstd"), encode_arrays(uniform, fmt)
    assert bytes(record[MANTISSAS_KEY].data) == bytes(plain[MANTISSAS_KEY].data)
    assert b'"version":1' in bytes(record["fedlpt.manifest"].data)
