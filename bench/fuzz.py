"""Decoder fuzz: a mutated wire record raises PayloadError, and nothing else, ever.

Base records: a small model state (floats of several shapes, a half tensor, an int, a
bool, an empty tensor) encoded at 2, 4, 8 and 12 bits with row, kernel and 7-value
blocks, plain and zstd-compressed. Each fuzzed record mutates one base record once:

* bytes: 1-4 bytes of one array overwritten (biased towards the .npy headers and the
  manifest, where the structure lives), the array truncated, or bytes appended;
* manifest: one field of the JSON (top level or one tensor's) replaced by a value of
  another type or an extreme (lists, objects, 2**63, negatives, NaN, unknown names),
  deleted, or a tensor entry duplicated or dropped, the record otherwise intact.

Beside it, the cost of the largest manifest a client may send: 4 MB listing 62,000 tiny
tensors, read by the server (which expects the model's tensor count) and by a reader with
no expectation.

    python -m bench.fuzz [--quick] [--records N] [--seed S]

Exits non-zero when any record raises anything but PayloadError (the first few are
printed with their tracebacks).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
import traceback
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

from bench._common import print_json, print_table
from fedlpt.quant import BFP
from fedlpt.quant.entropy import zstd_available
from fedlpt.quant.wire import (
    MANIFEST_KEY,
    PayloadError,
    decode_arrays,
    encode_arrays,
    read_manifest,
)

ODD_VALUES: tuple[object, ...] = (
    None, True, False, 0, -1, 1, 7, 17, 255, 2**31, 2**63, 2**64, -(2**63), 1e308, -0.5,
    float("nan"), "", "x", "float32", "int64", "bool", "row", "kernel", "tensor", "zstd",
    "none", [], [0], [1, 2], [2**62, 2**62], [-1, 4], [[1]], {}, {"a": 1}, "\u00e9\u0000",
)  # fmt: skip


def fuzz_state() -> dict[str, torch.Tensor]:
    """A small model state with every kind of tensor the format carries."""
    gen = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(8, generator=gen),
        "norm.weight": torch.ones(8),
        "fc.weight": torch.randn(10, 32, generator=gen) * 1e-3,
        "fc.bias": torch.zeros(10),
        "bn.num_batches_tracked": torch.tensor(17),
        "half": torch.randn(5, 2, generator=gen).half(),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
    }


def base_records() -> dict[str, ArrayRecord]:
    """The records mutated, by a label naming their format."""
    state = fuzz_state()
    compressions = ["none", "zstd"] if zstd_available() else ["none"]
    records = {}
    for bits, block in [(2, "row"), (4, "kernel"), (8, "row"), (12, 7)]:
        for compression in compressions:
            label = f"{bits}-bit {block} {compression}"
            records[label] = encode_arrays(
                state, BFP(bits, block), torch.Generator().manual_seed(bits),
                compression=compression,
            )  # fmt: skip
    return records


def _npy(data: bytes) -> Array:
    header = io.BytesIO()
    array = np.frombuffer(data, dtype=np.uint8)
    npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(array))
    return Array(
        dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=header.getvalue() + data
    )


def _mutate_bytes(record: ArrayRecord, rng: random.Random) -> ArrayRecord:
    key = rng.choice(list(record))
    data = bytearray(record[key].data)
    action = rng.random()
    if action < 0.6 and data:
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(data), 200) if rng.random() < 0.7 else len(data))
            data[pos] = rng.randrange(256)
    elif action < 0.8:
        del data[rng.randrange(len(data) + 1) :]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    array = record[key]
    record[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data))
    return record


def _mutate_manifest(record: ArrayRecord, rng: random.Random) -> ArrayRecord:
    stream = io.BytesIO(record[MANIFEST_KEY].data)
    npy_format.read_magic(stream)
    npy_format.read_array_header_1_0(stream)
    manifest = json.loads(stream.read())
    tensors = manifest["tensors"]
    action = rng.random()
    if action < 0.15:
        target: dict = manifest
    else:
        target = rng.choice(tensors)
    if action < 0.75:
        key = rng.choice([*target, "raw", "bits", "extra"])
        if rng.random() < 0.15:
            target.pop(key, None)
        else:
            target[key] = rng.choice(ODD_VALUES)
    elif action < 0.9 and target is not manifest and isinstance(target.get("shape"), list):
        shape = target["shape"]
        if shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 1 << 20, 2**40, 2**62])
        else:
            shape.append(rng.choice([0, 1, 2]))
    elif rng.random() < 0.5:
        tensors.append(dict(rng.choice(tensors)))
    else:
        tensors.pop(rng.randrange(len(tensors)))
    text = json.dumps(manifest, separators=(",", ":")).encode()
    record[MANIFEST_KEY] = _npy(text)
    return record


def mutated_records(
    bases: dict[str, ArrayRecord], count: int, seed: int
) -> Iterator[tuple[str, ArrayRecord]]:
    """``count`` mutated copies of ``bases`` (label, record), reproducible from ``seed``."""
    rng = random.Random(seed)
    labels = list(bases)
    for _ in range(count):
        label = rng.choice(labels)
        record = ArrayRecord(dict(bases[label].items()))
        if rng.random() < 0.5:
            yield label, _mutate_bytes(record, rng)
        else:
            yield label, _mutate_manifest(record, rng)


def run_fuzz(count: int, seed: int) -> tuple[Counter[str], list[str], float]:
    """Outcome counts (``decoded``/``rejected``/``other``), tracebacks of the first
    other exceptions, and the slowest decode in ms."""
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    slowest = 0.0
    for _, record in mutated_records(base_records(), count, seed):
        start = time.perf_counter()
        try:
            decode_arrays(record)
        except PayloadError:
            outcomes["rejected"] += 1
        except Exception:  # the property under test: nothing else may escape
            outcomes["other"] += 1
            if len(failures) < 5:
                failures.append(traceback.format_exc())
        else:
            outcomes["decoded"] += 1
        slowest = max(slowest, time.perf_counter() - start)
    return outcomes, failures, slowest * 1e3


def adversarial_manifest(tensors: int = 62_000) -> ArrayRecord:
    """A record whose manifest lists ``tensors`` one-value tensors (about 4 MB)."""
    entries = [
        {"name": f"t{i:06d}.w", "dtype": "float32", "shape": [1], "raw": True}
        for i in range(tensors)
    ]
    manifest = {"format": "fedlpt-bfp", "version": 1, "tensors": entries}
    record = ArrayRecord()
    record[MANIFEST_KEY] = _npy(json.dumps(manifest, separators=(",", ":")).encode())
    return record


def manifest_cost_ms(record: ArrayRecord, max_tensors: int | None) -> float:
    """CPU ms until the manifest is read or refused (PayloadError)."""
    start = time.process_time()
    try:
        if max_tensors is None:
            read_manifest(record)
        else:
            read_manifest(record, max_tensors=max_tensors)
    except PayloadError:
        pass
    return (time.process_time() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records instead of 100,000")
    parser.add_argument("--records", type=int, default=0, help="override the record count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = args.records or (10_000 if args.quick else 100_000)

    start = time.perf_counter()
    outcomes, failures, slowest_ms = run_fuzz(count, args.seed)
    wall = time.perf_counter() - start
    for failure in failures:
        print(failure)
    print(f"{count:,} mutated records over {len(base_records())} base records, seed {args.seed}")
    print_table(
        ["outcome", "records", "share %"],
        [[k, outcomes[k], 100 * outcomes[k] / count] for k in ("rejected", "decoded", "other")],
    )

    record = adversarial_manifest()
    size_mb = len(record[MANIFEST_KEY].data) / 1e6
    expected = len(fuzz_state())
    server_ms = min(manifest_cost_ms(record, expected) for _ in range(5))
    open_ms = min(manifest_cost_ms(record, None) for _ in range(3))
    print()
    print_table(
        ["adversarial manifest", "MB", "CPU ms"],
        [
            [f"server (expects {expected} tensors)", size_mb, server_ms],
            ["reader without an expectation", size_mb, open_ms],
        ],
    )
    print_json(
        {
            "records": count,
            "payload_errors": outcomes["rejected"],
            "decoded": outcomes["decoded"],
            "other_exceptions": outcomes["other"],
            "slowest_decode_ms": round(slowest_ms, 3),
            "adversarial_manifest_mb": round(size_mb, 2),
            "adversarial_manifest_server_ms": round(server_ms, 3),
            "adversarial_manifest_unbounded_ms": round(open_ms, 3),
            "wall_seconds": round(wall, 1),
        }
    )
    if outcomes["other"]:
        raise SystemExit(f"{outcomes['other']} records raised something other than PayloadError")


if __name__ == "__main__":
    main()
