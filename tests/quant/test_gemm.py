"""Exact int8 products: every backend against a float64 reference, digits, the choice."""

import logging
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fedlpt.quant import gemm

CPU_BACKENDS = [name for name in gemm.BACKENDS if gemm.available(name, "cpu")]


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double().t()


def test_float_and_a_fast_int8_backend_are_exact_here() -> None:
    assert "float" in CPU_BACKENDS
    # torch's _int_mm exists on every CPU build (fast or a loop); it must be exact.
    assert "int_mm" in CPU_BACKENDS


@pytest.mark.parametrize("name", CPU_BACKENDS)
@given(
    rows=st.integers(1, 40),
    inner=st.integers(1, 70),
    columns=st.integers(1, 20),
    wide=st.sampled_from([0, 3, 6, 9]),
    nonneg=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_backend_is_exact(
    name: str, rows: int, inner: int, columns: int, wide: int, nonneg: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (rows, inner), generator=generator, dtype=torch.int8)
    if nonneg:
        a = a.abs()
    # b: int8 codes shifted left by up to ``wide`` bits, as aligned weight rows are.
    b = torch.randint(-127, 128, (columns, inner), generator=generator, dtype=torch.int32)
    b = b << torch.randint(0, wide + 1, (columns, 1), generator=generator, dtype=torch.int32)
    a[0] = 127 if nonneg else -127  # the largest pairs, where a 16-bit sum would saturate
    # Exact where every partial sum is (float32 holds integers below 2**24).
    assume(inner * 127 * int(b.abs().max()) < 2**24)
    out = gemm.matmul_codes(a, b, a_nonneg=nonneg, backend_name=name)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), reference(a, b))


def test_int_mm_sums_exactly_beyond_float32s_integers() -> None:
    # int32 sums, digits combined in int64: one rounding to float32 at the end.
    a = torch.full((2, 64), -127, dtype=torch.int8)
    b = torch.full((3, 64), 127 << 9, dtype=torch.int32)
    b[1] = -b[1] + 1
    out = gemm.matmul_codes(a, b, backend_name="int_mm")
    assert torch.equal(out, reference(a, b).float())


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_scale_and_bias_follow_the_exact_sum(name: str) -> None:
    generator = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (33, 48), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (16, 48), generator=generator, dtype=torch.int8) << 2
    scale = torch.exp2(torch.randint(-20, 5, (16,), generator=generator).float())
    bias = torch.randn(16, generator=generator)
    out = gemm.matmul_codes(a, b, scale=scale, bias=bias, backend_name=name)
    # One float32 rounding: the exact product scaled by a power of two, plus the bias.
    expected = (reference(a, b).float() * scale) + bias
    assert torch.equal(out, expected)


@given(
    values=st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=30),
    base_bits=st.sampled_from([6, 7]),
)
def test_digits_sum_back_and_fit_their_range(values: list[int], base_bits: int) -> None:
    b = torch.tensor(values, dtype=torch.int32).view(1, -1)
    parts = gemm.digits(b, base_bits)
    total = sum(part.to(torch.int64) << (base_bits * i) for i, part in enumerate(parts))
    assert torch.equal(total, b.to(torch.int64))
    limit = 1 << base_bits
    for part in parts[:-1]:
        assert int(part.min()) >= 0 and int(part.max()) < limit
    assert -limit <= int(parts[-1].min()) and int(parts[-1].max()) < limit
    if len(parts) > 1:  # no more digits than needed
        assert int(parts[-1].abs().max()) > 0


def test_codes_must_be_int8_and_shapes_must_match() -> None:
    with pytest.raises(TypeError, match="int8"):
        gemm.matmul_codes(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="do not match"):
        gemm.matmul_codes(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="unknown int8 backend"):
        gemm.matmul_codes(
            torch.zeros(2, 3, dtype=torch.int8),
            torch.zeros(4, 3, dtype=torch.int8),
            backend_name="x",
        )


def test_pick_takes_the_fastest_exact_backend_that_beats_float32() -> None:
    choice = gemm._pick(
        {
            "int_mm": math.inf,
            "int_mm:signed": math.inf,
            "onednn": 0.005,
            "onednn:signed": 0.009,
            "float": 0.010,
        }
    )
    assert choice.backend == "onednn" and "0.50x" in choice.why and "reference loop" in choice.why
    # Signed products at 0.9x float32 (oneDNN saturating, two digits): not worth it.
    assert not choice.signed_fast
    choice = gemm._pick(
        {
            "int_mm": 0.004,
            "int_mm:signed": 0.004,
            "onednn": 0.005,
            "onednn:signed": 0.005,
            "float": 0.010,
        }
    )
    assert choice.backend == "int_mm" and choice.signed_fast


def test_pick_falls_back_to_float_when_no_int8_product_is_fast_enough() -> None:
    choice = gemm._pick({"int_mm": math.inf, "onednn": 0.009, "float": 0.010})
    assert choice.backend == "float" and "no exact int8 product" in choice.why


def test_choice_is_probed_once_and_logged(monkeypatch, caplog) -> None:
    gemm.forget_choice()
    calls = []
    monkeypatch.setattr(gemm, "probe", lambda device: calls.append(device) or {"float": 1.0})
    with caplog.at_level(logging.INFO, logger="fedlpt.quant.gemm"):
        assert gemm.backend("cpu") == "float"
        assert gemm.backend("cpu") == "float"
    assert len(calls) == 1
    assert sum("int8 products on cpu use float" in r.message for r in caplog.records) == 1
    gemm.forget_choice()


def test_environment_forces_a_backend(monkeypatch) -> None:
    gemm.forget_choice()
    monkeypatch.setenv(gemm.ENV_BACKEND, "float")
    assert gemm.choose("cpu") == ("float", f"forced by {gemm.ENV_BACKEND}")
    gemm.forget_choice()
    monkeypatch.setenv(gemm.ENV_BACKEND, "fastest")
    with pytest.raises(ValueError, match="must be one of"):
        gemm.choose("cpu")
    gemm.forget_choice()


def test_probe_times_every_exact_backend_with_both_signs() -> None:
    seconds = gemm.probe("cpu")
    assert set(seconds) == set(CPU_BACKENDS) | {f"{name}:signed" for name in CPU_BACKENDS}
    assert all(s > 0 for s in seconds.values())


def test_a_forced_backend_takes_every_product(monkeypatch) -> None:
    gemm.forget_choice()
    monkeypatch.setenv(gemm.ENV_BACKEND, "float")
    assert gemm.signed_products_fast("cpu")
    gemm.forget_choice()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(5, 12, 3), (40, 1152, 128), (17, 9, 10)])
def test_int_mm_is_exact_on_cuda_at_shapes_it_must_pad(shape) -> None:
    rows, inner, columns = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (rows, inner), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (columns, inner), generator=generator, dtype=torch.int32) << 3
    out = gemm.matmul_codes(a.cuda(), b.cuda(), backend_name="int_mm")
    assert torch.equal(out.cpu().double(), reference(a, b))
