"""Wire format: exact decode, byte formula, pass-through dtypes, and hostile input."""

import io
import json
from math import prod

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given
from hypothesis import strategies as st

from bench.fuzz import base_records, fuzz_state, mutated_records
from fedlpt.quant import BFP, num_blocks, packed_size, quantize
from fedlpt.quant.wire import (
    EXPONENTS_KEY,
    MANIFEST_KEY,
    MANTISSAS_KEY,
    RAW_KEY,
    PayloadError,
    decode_arrays,
    encode_arrays,
    to_state_dict,
)
from fedlpt.strategy.traffic import serialized_size


def small_model_state() -> dict[str, torch.Tensor]:
    return fuzz_state()  # every kind of tensor the format carries


formats = st.builds(
    BFP,
    bits=st.integers(2, 16),
    block=st.sampled_from(["tensor", "row", "kernel", 1, 7, 32]),
    rounding=st.just("nearest"),
)


@given(formats)
def test_decode_of_encode_equals_quantize_in_the_input_dtype(fmt: BFP) -> None:
    state = small_model_state()
    decoded = decode_arrays(encode_arrays(state, fmt))
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        expected = quantize(tensor, fmt) if tensor.is_floating_point() else tensor
        assert torch.equal(decoded[name], expected), name


def test_stochastic_encoding_of_values_already_on_the_grid_is_lossless() -> None:
    fmt = BFP(6, "row", "stochastic")
    state = {k: quantize(v, fmt) for k, v in small_model_state().items() if v.is_floating_point()}
    decoded = decode_arrays(encode_arrays(state, fmt, torch.Generator().manual_seed(1)))
    assert all(torch.equal(decoded[k], v) for k, v in state.items())


def test_kept_tensors_travel_exactly() -> None:
    state = small_model_state()
    decoded = decode_arrays(encode_arrays(state, BFP(4), keep_exact={"conv.bias"}))
    assert torch.equal(decoded["conv.bias"], state["conv.bias"])
    assert not torch.equal(decoded["conv.weight"], state["conv.weight"])


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 11, 16])
@pytest.mark.parametrize("block", ["row", "kernel", 32])
def test_buffers_have_exactly_the_documented_sizes(bits: int, block) -> None:
    state = small_model_state()
    record = encode_arrays(state, BFP(bits, block))
    floats = [t for t in state.values() if t.is_floating_point()]
    others = [t for t in state.values() if not t.is_floating_point()]

    def body(key: str) -> int:
        return len(record[key].data) - 128  # version-1.0 .npy header, 128 bytes

    assert body(MANTISSAS_KEY) == sum(packed_size(t.numel(), bits) for t in floats)
    assert body(EXPONENTS_KEY) == sum(num_blocks(tuple(t.shape), block) for t in floats)
    assert body(RAW_KEY) == sum(t.numel() * t.element_size() for t in others)
    assert set(record) == {MANIFEST_KEY, MANTISSAS_KEY, EXPONENTS_KEY, RAW_KEY}


def test_a_model_of_only_floats_needs_no_raw_array() -> None:
    record = encode_arrays({"w": torch.randn(3, 3)}, BFP(8))
    assert RAW_KEY not in record
    assert set(decode_arrays(record)) == {"w"}


def test_eight_bit_upload_is_about_four_times_smaller_than_fp32() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(256, 1024, generator=gen), "b": torch.randn(256, generator=gen)}
    fp32 = serialized_size(ArrayRecord(state))
    packed = serialized_size(encode_arrays(state, BFP(8)))
    assert 3.95 < fp32 / packed < 4.0
    assert 7.8 < fp32 / serialized_size(encode_arrays(state, BFP(4))) < 8.0


def test_plain_flower_records_decode_through_the_same_entry_point() -> None:
    state = {"w": torch.randn(3, 4)}
    assert torch.equal(to_state_dict(ArrayRecord(state))["w"], state["w"])
    assert torch.equal(
        to_state_dict(encode_arrays(state, BFP(8, rounding="nearest")))["w"],
        quantize(state["w"], BFP(8, rounding="nearest")),
    )


def test_encode_rejects_unknown_keep_exact_names_and_non_tensors() -> None:
    with pytest.raises(ValueError, match="not there"):
        encode_arrays({"w": torch.zeros(2)}, BFP(8), keep_exact={"v"})
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        encode_arrays({"w": np.zeros(2)}, BFP(8))  # type: ignore[dict-item]


# ---- hostile input -------------------------------------------------------------------


def npy_array(values: np.ndarray) -> Array:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Array(
        dtype=str(values.dtype),
        shape=tuple(values.shape),
        stype="numpy.ndarray",
        data=buffer.getvalue(),
    )


def with_manifest(record: ArrayRecord, edit) -> ArrayRecord:
    manifest = json.loads(record[MANIFEST_KEY].numpy().tobytes())
    edit(manifest)
    forged = ArrayRecord({k: v for k, v in record.items()})
    forged[MANIFEST_KEY] = npy_array(np.frombuffer(json.dumps(manifest).encode(), np.uint8))
    return forged


def valid_record() -> ArrayRecord:
    return encode_arrays(small_model_state(), BFP(5, "row"))


def set_entry(index: int, **fields):
    def edit(manifest):
        manifest["tensors"][index].update(fields)

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(version=3), "unknown format version 3"),
        (lambda m: m.update(version=2), "compression must be one of"),
        (lambda m: m.update(version=2, compression="lzma"), "compression must be one of"),
        (lambda m: m.update(compression="zstd"), "unknown format version 1 with fields"),
        (lambda m: m.update(format="other"), "format"),
        (lambda m: m.update(tensors={}), "'tensors' must be a list"),
        (set_entry(0, shape=[8, 3, 3, 4]), "mantissa buffer has"),
        (set_entry(0, shape=[1 << 20, 1 << 20]), "claims"),
        (set_entry(0, shape=[1 << 40, 1 << 20]), "invalid shape"),
        (set_entry(0, shape=[-8, 3]), "invalid shape"),
        (set_entry(0, shape="8x3"), "invalid shape"),
        (set_entry(0, bits=1), r"bits must be in 2\.\.16"),
        (set_entry(0, bits=17), r"bits must be in 2\.\.16"),
        (set_entry(0, bits=6), "mantissa buffer has"),
        (set_entry(0, block="kernel"), "exponent buffer has"),
        (set_entry(0, block="rows"), "invalid block"),
        (set_entry(0, dtype="complex64"), "unknown dtype"),
        (set_entry(0, dtype=["float32"]), "unknown dtype"),
        (set_entry(0, dtype={"float32": 1}), "unknown dtype"),
        (set_entry(0, shape=[0, 1 << 63]), "invalid shape"),
        (set_entry(0, dtype="int32"), "BFP-encoded but has dtype"),
        (set_entry(1, name="conv.weight"), "appears twice"),
        (set_entry(5, shape=[2]), "raw buffer has"),
        (set_entry(0, extra=1), "has fields"),
        (lambda m: m["tensors"].pop(5), "raw buffer has"),
    ],
)
def test_forged_manifests_raise_payload_errors_naming_the_problem(edit, match) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_arrays(with_manifest(valid_record(), edit))


def truncate(key: str, n: int):
    def change(record: ArrayRecord) -> None:
        array = record[key]
        record[key] = Array(
            dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-n]
        )

    return change


def replace_body(key: str, values: np.ndarray):
    def change(record: ArrayRecord) -> None:
        record[key] = npy_array(values)

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        (truncate(MANTISSAS_KEY, 1), "header says"),
        (replace_body(MANTISSAS_KEY, np.zeros(3, np.uint8)), "mantissa buffer has 3 bytes"),
        (replace_body(EXPONENTS_KEY, np.full(18, 127, np.int8)), "exponent buffer has"),
        (replace_body(EXPONENTS_KEY, np.zeros(19, np.int16)), "numpy.ndarray of int8"),
        (replace_body(RAW_KEY, np.zeros(10**6, np.uint8)), "raw buffer has 1000000 bytes"),
        (lambda r: r.pop(EXPONENTS_KEY), r"missing arrays \['fedlpt.exponents'\]"),
        (lambda r: r.pop(RAW_KEY), r"missing arrays \['fedlpt.raw'\]"),
        (lambda r: r.__setitem__("extra", npy_array(np.zeros(1))), "unexpected arrays"),
        (lambda r: r.pop(MANIFEST_KEY), "no 'fedlpt.manifest'"),
    ],
)
def test_broken_buffers_raise_payload_errors(change, match) -> None:
    record = valid_record()
    change(record)
    with pytest.raises(PayloadError, match=match):
        decode_arrays(record)


def test_exponents_outside_the_format_range_are_rejected() -> None:
    record = valid_record()
    exps = record[EXPONENTS_KEY].numpy().copy()
    exps[0] = -128
    record[EXPONENTS_KEY] = npy_array(exps)
    with pytest.raises(PayloadError, match="exponents outside"):
        decode_arrays(record)


def test_a_header_claiming_gigabytes_allocates_nothing() -> None:
    record = valid_record()
    forged = b"\x93NUMPY\x01\x00v\x00" + (
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (4000000000,), }"
    )
    forged = forged.ljust(128 - 1) + b"\n"
    record[MANTISSAS_KEY] = Array(
        dtype="uint8", shape=(4_000_000_000,), stype="numpy.ndarray", data=forged + b"\x00" * 10
    )
    with pytest.raises(PayloadError, match="header says"):
        decode_arrays(record)


def test_mutated_records_raise_only_payload_errors() -> None:
    # bench.fuzz runs the same mutations over 100,000 records.
    outcomes = {"decoded": 0, "rejected": 0}
    for _, record in mutated_records(base_records(), 2000, seed=1234):
        try:
            decoded = decode_arrays(record)
        except PayloadError:
            outcomes["rejected"] += 1
        else:
            outcomes["decoded"] += 1
            assert all(prod(t.shape) == t.numel() for t in decoded.values())
    assert outcomes["rejected"] > 1500  # the structure is checked, not just survived


def test_non_records_are_rejected() -> None:
    with pytest.raises(PayloadError, match="expected an ArrayRecord"):
        decode_arrays({"fedlpt.manifest": 1})  # type: ignore[arg-type]
