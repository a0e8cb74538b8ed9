"""The bit-packed wire format: a whole model in one Flower ``ArrayRecord`` of 3-4 Arrays.

Flower adds a few hundred bytes of framing per ``Array``, so instead of one Array per
tensor the record holds (each a 1-D NumPy ``.npy`` array, so any Flower tool can read it):

* ``fedlpt.manifest``  uint8: UTF-8 JSON ``{"format": "fedlpt-bfp", "version": 1,
  "tensors": [...]}``; each tensor ``{"name", "dtype", "shape"}`` plus ``"bits"`` and
  ``"block"`` when BFP-encoded, or ``"raw": true`` when carried exactly. Version 2 adds
  ``"compression": "zstd"``: the mantissas are then one zstd frame (see ``entropy``);
  uncompressed records stay version 1, readable by every fedlpt;
* ``fedlpt.mantissas`` uint8: every BFP tensor's codes, bit-packed (see ``packing``),
  each tensor starting on a byte boundary: ``sum(ceil(numel * bits / 8))`` bytes;
* ``fedlpt.exponents`` int8: one per block (see ``bfp.block_layout``), in tensor order;
* ``fedlpt.raw``       uint8: the exact little-endian bytes of the raw tensors (only
  present when there are any).

The decoder trusts nothing: sizes are computed from the manifest in Python integers and
checked against the bytes received before anything is allocated; a compressed frame must
declare exactly the size the manifest implies before it is decompressed.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Collection, Mapping
from math import prod
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format
from torch import Tensor

from .bfp import (
    BFP,
    EXPONENT_MAX,
    EXPONENT_MIN,
    BlockKind,
    check_bits,
    check_block,
    decode_codes,
    encode_codes,
    num_blocks,
)
from .entropy import check_compression, compress, decompress
from .packing import pack_bits, packed_size, unpack_bits

FORMAT_NAME = "fedlpt-bfp"
FORMAT_VERSION = 2  # written only with compression; version 1 otherwise
UNCOMPRESSED_VERSION = 1
MANIFEST_KEY = "fedlpt.manifest"
MANTISSAS_KEY = "fedlpt.mantissas"
EXPONENTS_KEY = "fedlpt.exponents"
RAW_KEY = "fedlpt.raw"
MAX_MANIFEST_BYTES = 4 << 20
MAX_TENSORS = 1 << 16
MANIFEST_BYTES_PER_TENSOR = 1024
MAX_DIMS = 16
MAX_ELEMENTS = 1 << 34  # 16 G values: far above any model a client trains, far below 2**63

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class PayloadError(ValueError):
    """A record that is not a well-formed fedlpt payload (malformed, truncated, forged)."""


def is_encoded(record: ArrayRecord) -> bool:
    """Whether ``record`` claims to be in the fedlpt wire format (has a manifest)."""
    return MANIFEST_KEY in record


def _npy_array(data: np.ndarray) -> Array:
    """A Flower ``Array`` holding 1-D ``data`` as .npy bytes, with one copy of the payload."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(data))
    return Array(
        dtype=str(data.dtype),
        shape=tuple(data.shape),
        stype="numpy.ndarray",
        data=b"".join((header.getvalue(), np.ascontiguousarray(data).data)),
    )


def encode_arrays(
    tensors: Mapping[str, Tensor],
    fmt: BFP,
    generator: torch.Generator | None = None,
    *,
    keep_exact: Collection[str] = (),
    compression: str = "none",
) -> ArrayRecord:
    """Encode named tensors into one bit-packed ``ArrayRecord``.

    Floating tensors are BFP-encoded with ``fmt`` unless named in ``keep_exact``; other
    dtypes (and kept ones) travel exactly. For nearest rounding
    ``decode_arrays(encode_arrays(t, f))[k]`` equals ``quantize(t[k], f)``.
    ``compression="zstd"`` entropy-codes the packed mantissas losslessly, unless that
    makes them no smaller (the record is then written uncompressed).

    Raises:
        CompressionUnavailableError: ``"zstd"`` without the ``zstandard`` library.
    """
    if not isinstance(fmt, BFP):
        raise TypeError(f"fmt must be a BFP, got {type(fmt).__name__}")
    check_compression(compression)
    unknown = set(keep_exact) - set(tensors)
    if unknown:
        raise ValueError(f"keep_exact names tensors that are not there: {sorted(unknown)}")
    entries: list[dict[str, object]] = []
    mantissa_sizes: list[int] = []
    raw_parts: list[bytes] = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name!r} has dtype {tensor.dtype}, which the format cannot carry")
        entry: dict[str, object] = {
            "name": name,
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
        }
        if tensor.is_floating_point() and name not in keep_exact:
            entry.update(bits=fmt.bits, block=fmt.block)
            mantissa_sizes.append(packed_size(tensor.numel(), fmt.bits))
        else:
            entry["raw"] = True
            raw_parts.append(_raw_bytes(tensor))
        entries.append(entry)

    # Codes go straight into their slot of the mantissa buffer where no packing is needed.
    mantissas = np.empty(sum(mantissa_sizes), dtype=np.uint8)
    exponents: list[Tensor] = []
    offset = 0
    encoded = (name for name, e in zip(tensors, entries, strict=True) if "bits" in e)
    for name, size in zip(encoded, mantissa_sizes, strict=True):
        flat = tensors[name].detach().cpu()
        slot = mantissas[offset : offset + size]
        if fmt.bits == 8:
            _, exps = encode_codes(flat, fmt, generator, out=torch.from_numpy(slot.view(np.int8)))
        else:
            codes, exps = encode_codes(flat, fmt, generator)
            slot[:] = pack_bits(codes.numpy(), fmt.bits)
        exponents.append(exps)
        offset += size

    manifest: dict[str, object] = {"format": FORMAT_NAME, "version": UNCOMPRESSED_VERSION}
    if compression != "none":
        coded = compress(mantissas, compression)
        # Codes of an untrained model are close to uniform: then the frame is no smaller.
        if coded.size < mantissas.size:
            manifest.update(version=FORMAT_VERSION, compression=compression)
            mantissas = coded
    manifest["tensors"] = entries
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    record = ArrayRecord()
    record[MANIFEST_KEY] = _npy_array(np.frombuffer(manifest_bytes, dtype=np.uint8))
    record[MANTISSAS_KEY] = _npy_array(mantissas)
    exps_all = torch.cat(exponents) if exponents else torch.empty(0, dtype=torch.int8)
    record[EXPONENTS_KEY] = _npy_array(exps_all.numpy())
    if raw_parts:
        record[RAW_KEY] = _npy_array(np.frombuffer(b"".join(raw_parts), dtype=np.uint8))
    return record


def _raw_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _read_npy(record: ArrayRecord, key: str, dtype: str) -> np.ndarray:
    """The 1-D array under ``key``, checked byte by byte without trusting its header."""
    if key not in record:
        raise PayloadError(f"record has no {key!r} array")
    array = record[key]
    if not isinstance(array, Array) or not isinstance(array.data, bytes | bytearray):
        raise PayloadError(f"{key!r} is not a Flower Array with bytes")
    if array.stype != "numpy.ndarray" or array.dtype != dtype:
        raise PayloadError(
            f"{key!r} must be a numpy.ndarray of {dtype}, got {array.stype!r} {array.dtype!r}"
        )
    stream = io.BytesIO(array.data)
    try:
        version = npy_format.read_magic(stream)
        if version != (1, 0):
            raise ValueError(f"npy version {version}")
        with warnings.catch_warnings():  # a forged header's odd escapes: not the log's business
            warnings.simplefilter("ignore")
            shape, fortran, npy_dtype = npy_format.read_array_header_1_0(stream)
    except Exception as err:  # NumPy's header parser raises tokenize/ast/value errors
        raise PayloadError(f"{key!r} has a malformed .npy header: {err!r}") from None
    body = len(array.data) - stream.tell()
    if npy_dtype != np.dtype(dtype) or fortran or shape != (body,):
        raise PayloadError(
            f"{key!r} header says {npy_dtype} {shape}, but carries {body} bytes of {dtype}"
        )
    if tuple(array.shape) != shape:
        raise PayloadError(f"{key!r} Array shape {array.shape} disagrees with its data {shape}")
    return np.frombuffer(array.data, dtype=np.dtype(dtype), offset=stream.tell())


def _check_entry(index: int, entry: object, seen: set[str]) -> dict[str, object]:
    where = f"manifest tensor #{index}"
    if not isinstance(entry, dict):
        raise PayloadError(f"{where} is not an object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise PayloadError(f"{where} has no valid name")
    where = f"manifest tensor {name!r}"
    if name in seen:
        raise PayloadError(f"{where} appears twice")
    seen.add(name)
    # A dtype that is a JSON list or object is unhashable: test the type first.
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
        raise PayloadError(f"{where} has unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        # Each dimension is bounded too: a zero-sized tensor passes the element limit
        # with any other dimension, which torch could not even index.
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS for d in shape
        )
    ):
        raise PayloadError(f"{where} has an invalid shape {shape!r}")
    if prod(shape) > MAX_ELEMENTS:
        raise PayloadError(f"{where} claims {prod(shape)} elements (limit {MAX_ELEMENTS})")
    allowed = (
        {"name", "dtype", "shape", "raw"}
        if "raw" in entry
        else {"name", "dtype", "shape", "bits", "block"}
    )
    if set(entry) != allowed or ("raw" in entry and entry["raw"] is not True):
        raise PayloadError(f"{where} has fields {sorted(entry)}, expected {sorted(allowed)}")
    if "raw" not in entry:
        if not _DTYPES[entry["dtype"]].is_floating_point:
            raise PayloadError(f"{where} is BFP-encoded but has dtype {entry['dtype']}")
        try:
            check_bits(entry["bits"], what=f"{where} bits")
        except ValueError as err:
            raise PayloadError(str(err)) from None
        try:
            check_block(entry["block"])
        except ValueError:
            raise PayloadError(f"{where} has an invalid block {entry['block']!r}") from None
    return entry


def read_manifest(record: ArrayRecord, max_tensors: int = MAX_TENSORS) -> list[dict[str, object]]:
    """The validated tensor entries of a fedlpt record's manifest.

    ``max_tensors``: a reader that knows how many tensors to expect (the server, which
    sent the model) refuses a longer list before validating any entry.
    """
    return _read_manifest(record, max_tensors)[1]


def _read_manifest(
    record: ArrayRecord, max_tensors: int = MAX_TENSORS
) -> tuple[str, list[dict[str, object]]]:
    """The record's compression and validated tensor entries."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    raw = _read_npy(record, MANIFEST_KEY, "uint8")
    # An entry is well under MANIFEST_BYTES_PER_TENSOR bytes (name, dtype, shape, bits,
    # block): an expected count bounds the bytes worth parsing too.
    byte_limit = min(MAX_MANIFEST_BYTES, 1024 + MANIFEST_BYTES_PER_TENSOR * max_tensors)
    if raw.size > byte_limit:
        raise PayloadError(f"manifest is {raw.size} bytes (limit {byte_limit})")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PayloadError(f"manifest is not valid UTF-8 JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PayloadError(f"manifest does not declare format {FORMAT_NAME!r}")
    version = manifest.get("version")
    if version == UNCOMPRESSED_VERSION and "compression" not in manifest:
        compression = "none"
    elif version == FORMAT_VERSION:
        compression = manifest.get("compression")
        try:
            check_compression(compression)
        except ValueError as err:
            raise PayloadError(f"manifest: {err}") from None
    else:
        raise PayloadError(
            f"unknown format version {version!r} with fields {sorted(manifest)} "
            f"(this reader: {UNCOMPRESSED_VERSION} and {FORMAT_VERSION} with 'compression')"
        )
    entries = manifest.get("tensors")
    limit = min(max_tensors, MAX_TENSORS)
    if not isinstance(entries, list):
        raise PayloadError("manifest 'tensors' must be a list")
    if len(entries) > limit:
        raise PayloadError(f"manifest lists {len(entries)} tensors, at most {limit} expected")
    seen: set[str] = set()
    return cast(str, compression), [_check_entry(i, e, seen) for i, e in enumerate(entries)]


def decode_arrays(record: ArrayRecord) -> dict[str, Tensor]:
    """Decode a record made by :func:`encode_arrays` into named tensors (input dtypes).

    Raises:
        PayloadError: the record is malformed in any way; the message names the problem.
    """
    compression, entries = _read_manifest(record)
    expected = {MANIFEST_KEY, MANTISSAS_KEY, EXPONENTS_KEY}
    raw_bytes_needed = sum(
        prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize for e in entries if "raw" in e
    )
    if any("raw" in e for e in entries):
        expected.add(RAW_KEY)
    if missing := expected - set(record):
        raise PayloadError(f"record is missing arrays {sorted(missing)}")
    if unexpected := set(record) - expected:
        raise PayloadError(f"record has unexpected arrays {sorted(unexpected)}")
    mantissas = _read_npy(record, MANTISSAS_KEY, "uint8")
    exponents = _read_npy(record, EXPONENTS_KEY, "int8")
    raw = _read_npy(record, RAW_KEY, "uint8") if RAW_KEY in expected else np.empty(0, np.uint8)
    encoded = [e for e in entries if "raw" not in e]
    need_mantissas = sum(packed_size(prod(e["shape"]), e["bits"]) for e in encoded)
    need_exponents = sum(num_blocks(e["shape"], e["block"]) for e in encoded)
    if compression != "none":
        try:
            mantissas = decompress(mantissas, compression, need_mantissas)
        except ValueError as err:
            raise PayloadError(f"mantissas: {err}") from None
    for what, have, need in (
        ("mantissa", mantissas.size, need_mantissas),
        ("exponent", exponents.size, need_exponents),
        ("raw", raw.size, raw_bytes_needed),
    ):
        if have != need:
            raise PayloadError(f"{what} buffer has {have} bytes, the manifest implies {need}")
    if exponents.size and (exponents.min() < EXPONENT_MIN or exponents.max() > EXPONENT_MAX):
        raise PayloadError(f"exponents outside [{EXPONENT_MIN}, {EXPONENT_MAX}]")

    out: dict[str, Tensor] = {}
    m_off = e_off = r_off = 0
    for entry in entries:
        shape, dtype = tuple(entry["shape"]), _DTYPES[entry["dtype"]]
        numel = prod(shape)
        if "raw" in entry:
            size = numel * dtype.itemsize
            chunk = raw[r_off : r_off + size]
            r_off += size
            exact = torch.from_numpy(chunk.copy()).view(dtype) if size else torch.empty(0)
            out[entry["name"]] = exact.to(dtype).view(shape)
            continue
        bits, block = int(entry["bits"]), cast(BlockKind, entry["block"])
        size, count = packed_size(numel, bits), num_blocks(shape, block)
        codes = unpack_bits(mantissas[m_off : m_off + size], bits, numel)
        exps = torch.from_numpy(exponents[e_off : e_off + count].copy())
        m_off, e_off = m_off + size, e_off + count
        values = decode_codes(_read_only_tensor(codes), exps, shape, bits, block)
        out[entry["name"]] = values if dtype == torch.float32 else values.to(dtype)
    return out


def _read_only_tensor(array: np.ndarray) -> Tensor:
    """A zero-copy tensor over a read-only buffer; decoding only ever reads it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def to_state_dict(record: ArrayRecord) -> dict[str, Tensor]:
    """Tensors of either a fedlpt record or a plain Flower ``ArrayRecord`` (FP32 path)."""
    if is_encoded(record):
        return decode_arrays(record)
    try:
        return dict(record.to_torch_state_dict())
    except Exception as err:  # Flower/NumPy raise many types on malformed arrays
        raise PayloadError(f"plain ArrayRecord could not be read: {err}") from None
