"""Bit packing: exact round trips, exact sizes, the documented bit layout, clear errors."""

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlpt.quant import pack_bits, packed_size, unpack_bits
from fedlpt.quant.packing import UNPACK_CHUNK


@st.composite
def signed_values(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    bits = draw(st.integers(1, 16))
    count = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=count)
    return bits, values


@given(signed_values())
def test_pack_then_unpack_returns_the_values_for_every_width_and_length(case) -> None:
    bits, values = case
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(values.size, bits) == -(-values.size * bits // 8)
    unpacked = unpack_bits(packed, bits, values.size)
    assert unpacked.dtype == (np.int8 if bits <= 8 else np.int16)
    np.testing.assert_array_equal(unpacked, values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_length_up_to_two_groups_round_trips_including_extremes(bits: int) -> None:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for count in range(0, 17):
        values = np.resize(np.array([low, high, 0, -1 if bits > 1 else 0]), count)
        np.testing.assert_array_equal(unpack_bits(pack_bits(values, bits), bits, count), values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_layout_is_least_significant_bit_first_two_complement(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=37)
    stream = [((int(v) & ((1 << bits) - 1)) >> k) & 1 for v in values for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = np.packbits(np.array(stream, dtype=np.uint8), bitorder="little")
    np.testing.assert_array_equal(pack_bits(values, bits), expected)


def test_pack_accepts_torch_tensors() -> None:
    values = torch.tensor([-8, 7, 3, 0, -1], dtype=torch.int8)
    np.testing.assert_array_equal(unpack_bits(pack_bits(values, 4), 4, 5), values.numpy())


@pytest.mark.parametrize("bits, bad", [(4, 8), (4, -9), (1, 1), (8, 128), (16, 1 << 15)])
def test_values_outside_the_signed_range_are_rejected_with_the_range(bits: int, bad: int) -> None:
    with pytest.raises(ValueError, match=r"must lie in \["):
        pack_bits(np.array([0, bad]), bits)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True])
def test_bad_bit_widths_are_rejected(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([0]), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(b"\x00", bits, 1)  # type: ignore[arg-type]


def test_float_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="integers"):
        pack_bits(np.array([0.5]), 4)


@pytest.mark.parametrize("extra", [-1, 1])
def test_unpack_rejects_a_buffer_of_the_wrong_size(extra: int) -> None:
    packed = pack_bits(np.arange(-4, 4), 4)
    buf = np.concatenate([packed, np.zeros(1, np.uint8)]) if extra > 0 else packed[:-1]
    with pytest.raises(ValueError, match="need 4 bytes"):
        unpack_bits(buf, 4, 8)


@pytest.mark.parametrize("bits", range(1, 17))
def test_values_spanning_several_unpacking_chunks_round_trip(bits: int) -> None:
    count = 2 * UNPACK_CHUNK + 13  # two chunk boundaries and a ragged tail
    rng = np.random.default_rng(bits)
    values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=count)
    np.testing.assert_array_equal(unpack_bits(pack_bits(values, bits), bits, count), values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_unpacking_scratch_memory_stays_within_twice_the_output(bits: int) -> None:
    # The server unpacks untrusted uploads: what unpacking allocates beside its result
    # must not grow faster than the result itself (it once reached 9x at 12 bits).
    count = 1 << 20
    rng = np.random.default_rng(bits)
    packed = pack_bits(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=count), bits)
    tracemalloc.start()
    try:
        out = unpack_bits(packed, bits, count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    scratch = peak - (0 if bits == 8 else out.nbytes)  # 8 bits is a zero-copy view
    assert scratch <= 2 * max(out.nbytes, 1), f"{scratch} bytes of scratch for {out.nbytes}"
