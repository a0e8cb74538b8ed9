"""Dense bit packing of small signed integers.

Layout: value ``j`` occupies bits ``[j*b, (j+1)*b)`` of the stream, where stream bit ``s``
is bit ``s % 8`` (least significant first) of byte ``s // 8``; each value is its ``b``-bit
two's complement. ``n`` values take exactly ``ceil(n * b / 8)`` bytes; unused high bits of
the last byte are zero.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_PACK_BITS = 1
MAX_PACK_BITS = 16
UNPACK_CHUNK = 1 << 16  # values per unpacking step; a multiple of 8


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"bits must be an int, got {bits!r}")
    if not MIN_PACK_BITS <= int(bits) <= MAX_PACK_BITS:
        raise ValueError(f"bits must be in {MIN_PACK_BITS}..{MAX_PACK_BITS}, got {bits}")
    return int(bits)


def _as_int_array(values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"pack_bits packs integers, got dtype {array.dtype}")
    return array.reshape(-1)


def pack_bits(values: object, bits: int) -> np.ndarray:
    """Pack signed integers in ``[-2**(b-1), 2**(b-1))`` into ``ceil(n*b/8)`` bytes.

    Args:
        values: integer ndarray or tensor (any shape, flattened in C order).
        bits: word length ``b``, 1..16.

    Returns:
        uint8 ndarray ``[ceil(n * b / 8)]``.
    """
    bits = _check_bits(bits)
    array = _as_int_array(values)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    info = np.iinfo(array.dtype)
    if array.size and (info.min < low or info.max > high):
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest > high:
            raise ValueError(
                f"values must lie in [{low}, {high}] for {bits}-bit packing, "
                f"got [{smallest}, {largest}]"
            )
    if bits == 8:
        return array.astype(np.int8).view(np.uint8)
    if bits == 16:
        return array.astype("<i2").view(np.uint8)
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        codes = (array & mask).astype(np.uint8)
        codes = np.pad(codes, (0, -codes.size % per_byte)).reshape(-1, per_byte)
        out = np.zeros(codes.shape[0], dtype=np.uint8)
        for j in range(per_byte):
            out |= codes[:, j] << np.uint8(j * bits)
        return out
    if bits < 8:
        # Eight b-bit values fill exactly b bytes: build them in one uint64 per group.
        codes = (array.astype(np.int64) & mask).astype(np.uint64)
        groups = np.pad(codes, (0, -codes.size % 8)).reshape(-1, 8)
        words = np.zeros(groups.shape[0], dtype="<u8")
        for j in range(8):
            words |= groups[:, j] << np.uint64(j * bits)
        out = words.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
        return out[: packed_size(array.size, bits)].copy()
    # 9..15 bits: through a bit matrix (16 bytes of scratch per value).
    codes = (array.astype(np.int64) & mask).astype("<u2")
    matrix = np.unpackbits(codes.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")
    return np.packbits(matrix[:, :bits].reshape(-1), bitorder="little")


def unpack_bits(buf: object, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` signed integers from packed bytes.

    Widths other than 8 and 16 are unpacked :data:`UNPACK_CHUNK` values at a time into
    the preallocated result, so the scratch memory is bounded by a constant (about
    1 MiB) rather than growing with ``count`` (the server decodes untrusted uploads).

    Args:
        buf: bytes-like or uint8 ndarray of exactly ``ceil(count * bits / 8)`` bytes.
        bits: word length ``b``, 1..16.
        count: number of values.

    Returns:
        int8 ndarray (``b <= 8``) or int16 ndarray (``b > 8``) of shape ``[count]``.
    """
    bits = _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"buf must be 1-D uint8, got {data.dtype} with shape {data.shape}")
    expected = packed_size(count, bits)
    if data.size != expected:
        raise ValueError(f"{count} values of {bits} bits need {expected} bytes, got {data.size}")
    if bits == 8:
        return data.view(np.int8)
    if bits == 16:
        return data.view("<i2").astype(np.int16)
    out = np.empty(int(count), dtype=np.int8 if bits <= 8 else np.int16)
    # A chunk of a multiple of 8 values ends on a byte boundary: the next starts on one.
    for start in range(0, int(count), UNPACK_CHUNK):
        stop = min(start + UNPACK_CHUNK, int(count))
        chunk = data[start * bits // 8 : packed_size(stop, bits)]
        out[start:stop] = _unpack_chunk(chunk, bits, stop - start)
    return out


def _unpack_chunk(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` values of ``bits`` (not 8 or 16) from ``data``, which starts a group."""
    sign = 1 << (bits - 1)
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
        codes = ((data[:, None] >> shifts) & np.uint8(mask)).reshape(-1)[:count]
    elif bits < 8:
        rows = -(-count // 8)
        padded = np.zeros(rows * bits, dtype=np.uint8)
        padded[: data.size] = data
        groups = np.zeros((rows, 8), dtype=np.uint8)
        groups[:, :bits] = padded.reshape(rows, bits)
        words = groups.view("<u8").reshape(-1)
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
        codes = ((words[:, None] >> shifts) & np.uint64(mask)).reshape(-1)[:count]
    else:
        matrix = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
        wide = np.zeros((count, 16), dtype=np.uint8)
        wide[:, :bits] = matrix
        codes = np.packbits(wide, axis=1, bitorder="little").view("<u2").reshape(-1)
    return (codes.astype(np.int32) ^ sign) - sign
