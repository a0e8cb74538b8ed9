"""IDX files, the format of MNIST and Fashion-MNIST, plain or gzipped.

An IDX file is two zero bytes, a type code, the number of dimensions, each dimension as
a big-endian uint32, then the values in C order (big-endian for multi-byte types).
:func:`read_idx` checks every part of that against the bytes it reads.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

# Type code -> NumPy dtype (big-endian where it matters), from the format's definition.
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 4
MAX_BYTES = 1 << 31  # 2 GiB: far above any dataset of this family
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """A file that is not a well-formed IDX file; the message names the file and the fault."""


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzipped or not), native byte order.

    Raises:
        IdxError: the file is not a well-formed IDX file (truncated, bad header, ...).
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(MAX_BYTES + 1)
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = _gunzip(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise IdxError(f"{path}: not a readable gzip file ({err})") from None
    if len(raw) > MAX_BYTES:
        raise IdxError(f"{path}: more than {MAX_BYTES} bytes")
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise IdxError(f"{path}: does not start with an IDX header")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_TYPES:
        raise IdxError(f"{path}: unknown IDX type code {type_code:#04x}")
    if not 1 <= ndim <= MAX_DIMS:
        raise IdxError(f"{path}: {ndim} dimensions (1..{MAX_DIMS} expected)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxError(
            f"{path}: header says {shape} of {dtype}, i.e. {expected} bytes, "
            f"but {len(raw) - header} follow"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def _gunzip(data: bytes) -> bytes:
    """Decompress ``data``, refusing more than :data:`MAX_BYTES` of output."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = decompressor.decompress(data, MAX_BYTES + 1)
    if len(out) > MAX_BYTES:
        raise OSError(f"decompresses to more than {MAX_BYTES} bytes")
    if not decompressor.eof:
        raise EOFError("the gzip stream ends early")
    return out


def find_idx_files(folder: str | Path, stems: tuple[str, ...]) -> list[Path] | None:
    """The files of ``stems`` in ``folder`` (each plain or ``.gz``), or None if one is missing."""
    folder = Path(folder)
    found = []
    for stem in stems:
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            return None
    return found
