"""Lossless entropy coding of packed codes (zstd), bounded against decompression bombs.

The codes of a trained model are far from uniform (most weights sit a few steps from
zero), so a general-purpose entropy coder shrinks them further: ``bench.codec`` measures
the ConvNet's upload after one epoch of training with and without it. The codes of a
freshly initialized model are close to uniform and do not shrink.

The decoder is handed untrusted bytes, so :func:`decompress` takes the size the caller
expects (the wire format computes it from the manifest) and refuses, before allocating
anything, a frame that declares another size, declares none, needs a dictionary, has
trailing bytes, or is longer than zstd's worst case for that size. Output is then
written into a buffer of exactly that size: a bomb cannot grow it.

``zstandard`` is the optional ``compress`` extra; it is imported when first needed.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 3  # zstd's own default
_INSTALL_HINT = 'pip install "fedlpt[compress]"'
_BLOCK_HEADER_BYTES = 3
_CHECKSUM_BYTES = 4
_RLE_BLOCK = 1
_RESERVED_BLOCK = 3
_CONTENTSIZE_ERROR = (1 << 64) - 2  # libzstd's "unknown" and "error" content sizes


class CompressionUnavailableError(ImportError):
    """zstd was asked for but the ``zstandard`` library is not installed."""


def check_compression(method: object) -> str:
    """``method`` if it is one of :data:`COMPRESSIONS`; otherwise ValueError naming them."""
    if not isinstance(method, str) or method not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {method!r}")
    return method


def zstd_available() -> bool:
    """Whether zstd coding can run here (the ``zstandard`` library imports)."""
    try:
        _zstandard()
    except CompressionUnavailableError:
        return False
    return True


def _zstandard() -> ModuleType:
    try:
        import zstandard
    except ImportError:
        raise CompressionUnavailableError(
            f"zstd compression needs the zstandard library: {_INSTALL_HINT}"
        ) from None
    return zstandard


def compress(data: np.ndarray, method: str) -> np.ndarray:
    """``data`` (1-D uint8) coded with ``method``, as 1-D uint8 (``"none"``: ``data``).

    Raises:
        CompressionUnavailableError: ``"zstd"`` without the ``zstandard`` library.
    """
    if check_compression(method) == "none":
        return data
    frame = _zstandard().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return np.frombuffer(frame.compress(np.ascontiguousarray(data).data), dtype=np.uint8)


def decompress(data: np.ndarray, method: str, size: int) -> np.ndarray:
    """Exactly ``size`` bytes decoded from ``data`` (1-D uint8) coded with ``method``.

    Raises:
        ValueError: ``data`` is not one well-formed frame of ``size`` bytes (the message
            says what is wrong), or zstd is unavailable here.
    """
    if check_compression(method) == "none":
        if data.size != size:
            raise ValueError(f"{data.size} bytes where {size} were expected")
        return data
    try:
        zstandard = _zstandard()
    except CompressionUnavailableError as err:
        raise ValueError(str(err)) from None
    if data.size > zstd_bound(size):
        raise ValueError(
            f"zstd frame is {data.size} bytes, more than zstd's worst case "
            f"{zstd_bound(size)} for {size} bytes"
        )
    buf = data.tobytes()
    try:
        params = zstandard.get_frame_parameters(buf)
    except zstandard.ZstdError as err:
        raise ValueError(f"not a zstd frame: {err}") from None
    if params.content_size != size:
        unknown = params.content_size < 0 or params.content_size >= _CONTENTSIZE_ERROR
        declared = "no size" if unknown else f"{params.content_size} bytes"
        raise ValueError(f"zstd frame declares {declared}, {size} bytes expected")
    if params.dict_id != 0:
        raise ValueError(f"zstd frame needs dictionary {params.dict_id}; none is used")
    try:
        length = _frame_length(buf, zstandard.frame_header_size(buf), params.has_checksum)
        out = zstandard.ZstdDecompressor().decompress(buf, max_output_size=size)
    except zstandard.ZstdError as err:
        raise ValueError(f"zstd frame does not decode: {err}") from None
    if length != len(buf):
        raise ValueError(f"zstd frame is {length} bytes, followed by {len(buf) - length} more")
    if len(out) != size:  # libzstd checks this too; cheap to be sure
        raise ValueError(f"zstd frame decodes to {len(out)} bytes, {size} expected")
    return np.frombuffer(out, dtype=np.uint8)


def zstd_bound(size: int) -> int:
    """The largest frame zstd makes of ``size`` bytes: libzstd's ``ZSTD_COMPRESSBOUND``,
    plus a margin for the frame header and checksum."""
    small = (128 << 10) - size >> 11 if size < 128 << 10 else 0
    return size + (size >> 8) + small + 32  # + frame header and checksum


def _frame_length(buf: bytes, header: int, has_checksum: bool) -> int:
    """The bytes one zstd frame spans (header, blocks, checksum), read from its block
    headers; ValueError when a block runs past the end or is of the reserved type."""
    pos = header
    while True:
        if pos + _BLOCK_HEADER_BYTES > len(buf):
            raise ValueError(f"zstd frame is truncated at byte {pos}")
        word = int.from_bytes(buf[pos : pos + _BLOCK_HEADER_BYTES], "little")
        last, kind, block_size = word & 1, (word >> 1) & 3, word >> 3
        if kind == _RESERVED_BLOCK:
            raise ValueError(f"zstd block at byte {pos} has the reserved type")
        pos += _BLOCK_HEADER_BYTES + (1 if kind == _RLE_BLOCK else block_size)
        if pos > len(buf):
            raise ValueError(f"zstd block runs past the frame's {len(buf)} bytes")
        if last:
            pos += _CHECKSUM_BYTES if has_checksum else 0
            if pos > len(buf):
                raise ValueError(f"zstd frame's checksum runs past its {len(buf)} bytes")
            return pos
