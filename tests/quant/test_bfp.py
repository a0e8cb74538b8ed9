"""BFP quantizer: grid membership, error bounds, unbiasedness, idempotence, clear errors."""

import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlpt.quant import (
    BFP,
    block_layout,
    check_bits,
    decode_codes,
    encode_codes,
    kernels,
    num_blocks,
    quantize,
    quantize_tensors,
    quantize_tensors_,
)
from fedlpt.quant.bfp import draw_seed, quantize_, stream_seed

BLOCKS = ["tensor", "row", "kernel", 1, 5, 16]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.sampled_from([(7,), (4, 6), (3, 2, 3, 3), (2, 5, 1), (1,), (33,)]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-30, 30))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2.0**log_scale
    if draw(st.booleans()):  # some exact zeros and a zero block
        x.view(-1)[: x.numel() // 3] = 0.0
    return x


formats = st.builds(
    BFP,
    bits=st.integers(2, 16),
    block=st.sampled_from(BLOCKS),
    rounding=st.sampled_from(["nearest", "stochastic"]),
)


def step_sizes(x: torch.Tensor, fmt: BFP) -> torch.Tensor:
    """One LSB per element, from the reference formula (independent of the implementation)."""
    flat = x.reshape(-1).double()
    steps, start = [], 0
    for count, size in block_layout(tuple(x.shape), fmt.block):
        for _ in range(count):
            largest = flat[start : start + size].abs().max().item()
            exp = max(math.floor(math.log2(largest)), -126) if largest > 0 else -126
            steps.append(torch.full((size,), 2.0 ** (exp - (fmt.bits - 2)), dtype=torch.float64))
            start += size
    return torch.cat(steps).view(x.shape) if steps else torch.empty(x.shape, dtype=torch.float64)


@given(tensors(), formats)
def test_values_land_on_the_block_grid_within_the_symmetric_range(x, fmt) -> None:
    q = quantize(x, fmt, torch.Generator().manual_seed(1))
    codes = q.double() / step_sizes(x, fmt)
    assert torch.equal(codes, codes.round())
    assert codes.abs().max() <= fmt.max_code


@given(tensors(), st.integers(2, 16), st.sampled_from(BLOCKS))
def test_nearest_error_is_half_a_step_except_at_the_top_clamp(x, bits, block) -> None:
    fmt = BFP(bits, block, "nearest")
    step = step_sizes(x, fmt)
    err = (quantize(x, fmt).double() - x.double()).abs() / step
    clamped = (x.double() / step).abs() > fmt.max_code
    assert (err[~clamped] <= 0.5).all()
    assert (err[clamped] < 1.0).all()


@given(tensors(), st.integers(2, 16), st.sampled_from(BLOCKS))
def test_stochastic_error_is_below_one_step(x, bits, block) -> None:
    fmt = BFP(bits, block, "stochastic")
    step = step_sizes(x, fmt)
    err = (quantize(x, fmt, torch.Generator().manual_seed(3)).double() - x.double()).abs()
    assert (err < step).all()


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.91, 0.004])
def test_stochastic_rounding_is_unbiased(bits: int, fraction: float) -> None:
    # A block whose maximum fixes the step to 1 / 2**(bits-2); the rest sit between steps.
    n = 400_000
    step = 2.0 ** -(bits - 2)
    x = torch.full((n,), fraction * step)
    x[0] = 1.0
    q = quantize(x, BFP(bits, "tensor", "stochastic"), torch.Generator().manual_seed(bits))
    mean_steps = (q[1:].double().mean() / step).item()
    # Five binomial standard errors of the rounding-up frequency, sqrt(f(1-f)/n).
    assert abs(mean_steps - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n) + 1e-5


@given(tensors(), formats)
def test_quantizing_twice_changes_nothing(x, fmt) -> None:
    q = quantize(x, fmt, torch.Generator().manual_seed(5))
    assert torch.equal(quantize(q, fmt, torch.Generator().manual_seed(6)), q)


def test_each_element_is_rounded_up_with_exactly_its_fraction() -> None:
    """Per element, over 20,000 independent draws: the fraction of draws that round up
    matches the element's own fractional position (a dither with a handful of random bits,
    or a hash with a weak lane, misses for some elements by far more than the noise)."""
    fractions = torch.linspace(0.001, 0.999, 257)
    step = 2.0**-6  # 8 bits, block maximum 1
    x = torch.cat([torch.ones(1), fractions * step])
    fmt = BFP(8, "tensor", "stochastic")
    draws = 20_000
    up = torch.zeros(len(fractions), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        up += quantize(x, fmt, generator)[1:].double() / step
    frequency = up / draws
    noise = torch.sqrt(fractions.double() * (1 - fractions.double()) / draws)
    z = (frequency - fractions.double()) / noise
    assert z.abs().max() < 5.0, z.abs().max()
    assert abs(z.mean()) < 5 / math.sqrt(len(fractions))  # no drift across elements


def test_quantize_tensors_equals_quantizing_each_with_its_stream() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(128), torch.randn(16, 9, 3, 3), torch.randn(10, 37), torch.randn(5)]
    fmt = BFP(6, 16, "stochastic")  # blocks of 16: tails included
    batched = quantize_tensors(tensors, fmt, torch.Generator().manual_seed(7))
    base = draw_seed(torch.Generator().manual_seed(7))
    for index, (tensor, out) in enumerate(zip(tensors, batched, strict=True)):
        alone = quantize(tensor, fmt, seed=stream_seed(base, index))
        assert torch.equal(out, alone)
    single = quantize(tensors[1], fmt, torch.Generator().manual_seed(3))
    assert torch.equal(
        single, quantize_tensors([tensors[1]], fmt, torch.Generator().manual_seed(3))[0]
    )
    for check in (True, False):  # False rounds the tensors where they lie
        in_place = [t.clone() for t in tensors]
        pointers = [t.data_ptr() for t in in_place]
        quantize_tensors_(in_place, fmt, torch.Generator().manual_seed(7), check=check)
        assert all(torch.equal(a, b) for a, b in zip(in_place, batched, strict=True))
        assert [t.data_ptr() for t in in_place] == pointers
    assert quantize_tensors([], fmt, gen) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: [torch.randn(12, 10).t(), torch.randn(30)],  # not contiguous
        lambda: [torch.randn(12, 10, dtype=torch.float64), torch.randn(30)],  # not float32
        lambda: list(torch.randn(2, 60).unbind()),  # two views of one storage
    ],
    ids=["transposed", "float64", "shared-storage"],
)
def test_quantize_tensors_in_place_of_tensors_it_cannot_write_directly(make) -> None:
    fmt = BFP(5, "row", "stochastic")
    tensors = make()
    expected = quantize_tensors(tensors, fmt, torch.Generator().manual_seed(4))
    quantize_tensors_(tensors, fmt, torch.Generator().manual_seed(4), check=False)
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))


def test_a_cpu_seed_is_torchs_randint_draw_and_threads_draw_apart() -> None:
    # Seeds are the stream every stored result was made with: the draw must not change.
    ours, torchs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(200):
        expected = int(torch.randint(0, 2**31, (1,), generator=torchs).item())
        assert draw_seed(ours) == expected
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    drawn: list[list[int]] = [[] for _ in range(4)]

    def draw(i: int) -> None:
        drawn[i].extend(draw_seed(generators[i]) for _ in range(500))

    expected = [
        [
            int(s)
            for s in torch.randint(0, 2**31, (500,), generator=torch.Generator().manual_seed(i))
        ]
        for i in range(4)
    ]
    threads = [threading.Thread(target=draw, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert drawn == expected


def test_the_dither_depends_on_the_seed_and_the_element_only() -> None:
    x = torch.randn(4, 100)
    fmt = BFP(4, "row", "stochastic")
    one = quantize(x, fmt, seed=123)
    assert torch.equal(one, quantize(x, fmt, seed=123))
    assert not torch.equal(one, quantize(x, fmt, seed=124))
    # A row rounded alone with its offset in the stream equals the same row of the whole.
    rows = [quantize(x[r : r + 1], fmt, seed=123) for r in range(4)]
    assert not torch.equal(torch.cat(rows), one)  # each row restarts the counter at 0


@pytest.mark.compiled
@pytest.mark.parametrize(
    "fmt",
    [BFP(2, "row"), BFP(8, "kernel"), BFP(8, 16), BFP(12, "row", "nearest"), BFP(16, "tensor")],
    ids=str,
)
def test_compiled_and_eager_kernels_agree_bit_for_bit(fmt: BFP) -> None:
    x = torch.randn(6, 5, 3, 3) * 3
    x[1] = 0.0  # a zero block
    x[2] *= 2.0**-120  # a tiny block
    tensors = [x, torch.randn(37), torch.randn(10, 20)]
    compiled = (
        quantize(x, fmt, seed=99),
        encode_codes(x, fmt, seed=99),
        quantize_tensors(tensors, fmt, torch.Generator().manual_seed(1)),
        _rounded_in_place(tensors, fmt),
        quantize(x, fmt, seed=99, check=False),
    )
    assert kernels.compiled()
    kernels.set_compiled(False)
    eager = (
        quantize(x, fmt, seed=99),
        encode_codes(x, fmt, seed=99),
        quantize_tensors(tensors, fmt, torch.Generator().manual_seed(1)),
        _rounded_in_place(tensors, fmt),
        quantize(x, fmt, seed=99, check=False),
    )
    assert torch.equal(compiled[0], eager[0])
    assert torch.equal(compiled[4], eager[4]) and torch.equal(compiled[4], compiled[0])
    assert all(torch.equal(a, b) for a, b in zip(compiled[1], eager[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(compiled[2], eager[2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(compiled[3], eager[3], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(compiled[3], compiled[2], strict=True))


def _rounded_in_place(tensors: list[torch.Tensor], fmt: BFP) -> list[torch.Tensor]:
    copies = [t.clone() for t in tensors]
    quantize_tensors_(copies, fmt, torch.Generator().manual_seed(1), check=False)
    return copies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_the_stream_is_the_same_on_a_gpu() -> None:
    x = torch.randn(64, 300) * 3
    for fmt in (BFP(8, "row"), BFP(4, 16), BFP(12, "kernel", "nearest")):
        assert torch.equal(quantize(x, fmt, seed=5), quantize(x.cuda(), fmt, seed=5).cpu())
        codes, exponents = encode_codes(x.cuda(), fmt, seed=5)
        assert codes.is_cuda
        values = decode_codes(codes.cpu(), exponents.cpu(), tuple(x.shape), fmt.bits, fmt.block)
        assert torch.equal(values, quantize(x, fmt, seed=5))


@pytest.mark.parametrize("bits", [3, 8, 12])
def test_stochastic_rounding_never_moves_a_value_already_on_the_grid(bits: int) -> None:
    # Odd codes are where a dither that can reach -1/2 exactly would tie and round to even.
    fmt = BFP(bits, "tensor", "stochastic")
    codes = torch.arange(-fmt.max_code, fmt.max_code + 1, 2).repeat(2_000_000 // fmt.max_code)
    grid = codes.float() * 2.0 ** -(bits - 2)
    assert torch.equal(quantize(grid, fmt, torch.Generator().manual_seed(0)), grid)
    out, _ = encode_codes(grid, fmt, torch.Generator().manual_seed(0))
    assert torch.equal(out.long(), codes)


def test_negative_block_maximum_does_not_raise_the_exponent() -> None:
    # Paper's asymmetric range: -1.999 rounds to -2**(b-1) steps = -2.0 and a second pass
    # changes the other values. The symmetric range keeps it at the top code.
    x = torch.tensor([-1.999, 0.3])
    fmt = BFP(4, "tensor", "nearest")
    q = quantize(x, fmt)
    assert q.tolist() == [-1.75, 0.25]
    assert torch.equal(quantize(q, fmt), q)


@given(tensors(), formats)
def test_codes_decode_to_the_quantized_values(x, fmt) -> None:
    codes, exps = encode_codes(x, fmt, torch.Generator().manual_seed(7))
    assert codes.dtype == (torch.int8 if fmt.bits <= 8 else torch.int16)
    assert exps.numel() == num_blocks(tuple(x.shape), fmt.block)
    decoded = decode_codes(codes, exps, tuple(x.shape), fmt.bits, fmt.block)
    assert torch.equal(decoded, quantize(x, fmt, torch.Generator().manual_seed(7)))


def test_same_generator_seed_gives_the_same_stochastic_result() -> None:
    x = torch.randn(300, 500)
    fmt = BFP(6, "row", "stochastic")
    a = quantize(x, fmt, torch.Generator().manual_seed(11))
    b = quantize(x, fmt, torch.Generator().manual_seed(11))
    c = quantize(x, fmt, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_all_zero_blocks_stay_exactly_zero() -> None:
    x = torch.zeros(4, 8)
    x[1] = torch.linspace(-1, 1, 8)
    for rounding in ("nearest", "stochastic"):
        q = quantize(x, BFP(8, "row", rounding))
        assert torch.equal(q[[0, 2, 3]], torch.zeros(3, 8))


def test_tiny_and_huge_magnitudes_stay_exact_down_to_the_smallest_step() -> None:
    # The exponent floor is -126, so at 16 bits the smallest step is 2**-140.
    x = torch.tensor([2.0**-140, 3.0 * 2.0**-135, 2.0**127, -(2.0**120), 1.5 * 2.0**-126])
    for value in x:
        block = value.reshape(1)
        assert torch.equal(quantize(block, BFP(16, "tensor", "nearest")), block)
    below = torch.tensor([2.0**-149])
    assert quantize(below, BFP(16, "tensor", "nearest")).item() == 0.0


def test_block_layout_counts_match_the_documentation() -> None:
    assert num_blocks((128, 64, 3, 3), "row") == 128
    assert num_blocks((128, 64, 3, 3), "kernel") == 128 * 64
    assert num_blocks((10, 2048), "kernel") == 10 * 2048  # per element, as the paper's "BC"
    assert num_blocks((128,), "row") == 1
    assert num_blocks((128,), "kernel") == 1
    assert num_blocks((100,), 32) == 4
    assert num_blocks((0, 5), "row") == 0


def test_other_float_dtypes_keep_their_dtype_and_shape() -> None:
    x = torch.randn(3, 5, dtype=torch.float64)
    q = quantize(x, BFP(8, "row", "nearest"))
    assert q.dtype == torch.float64 and q.shape == x.shape
    assert torch.equal(q, quantize(x.float(), BFP(8, "row", "nearest")).double())


def test_in_place_quantize_matches_out_of_place() -> None:
    x = torch.randn(70, 1000)
    fmt = BFP(5, "row", "stochastic")
    expected = quantize(x, fmt, torch.Generator().manual_seed(2))
    assert torch.equal(quantize_(x, fmt, torch.Generator().manual_seed(2)), expected)
    assert torch.equal(x, expected)


def test_large_rows_are_processed_in_column_chunks_the_same_way() -> None:
    x = torch.randn(2, 200_000)
    q = quantize(x, BFP(8, "row", "nearest"))
    step = step_sizes(x, BFP(8, "row", "nearest")).float()
    assert torch.equal(q, torch.clamp(torch.round(x / step), -127, 127) * step)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_is_rejected(bad: float) -> None:
    x = torch.ones(4, 4)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, BFP(8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_codes(x, BFP(8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 1}, "bits must be in 2..16"),
        ({"bits": 17}, "bits must be in 2..16"),
        ({"bits": 8.0}, "bits must be an int"),
        ({"bits": True}, "bits must be an int"),
        ({"bits": 8, "block": "channel"}, "block must be one of"),
        ({"bits": 8, "block": 0}, "block must be one of"),
        ({"bits": 8, "block": True}, "block must be one of"),
        ({"bits": 8, "rounding": "floor"}, "rounding must be"),
    ],
)
def test_bad_formats_are_rejected_with_a_clear_message(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BFP(**kwargs)


def test_integer_tensors_are_not_quantized() -> None:
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.arange(4), BFP(8))


@given(
    bits=st.integers(2, 16),
    block=st.one_of(st.sampled_from(["tensor", "row", "kernel"]), st.integers(1, 4096)),
    rounding=st.sampled_from(["nearest", "stochastic"]),
)
def test_format_travels_as_flat_config_and_back(bits: int, block, rounding: str) -> None:
    fmt = BFP(bits, block, rounding)
    config = fmt.to_config()
    assert all(isinstance(v, int | str) for v in config.values())
    assert BFP.from_config(config) == fmt
    # A decimal-string block (as TOML or a command line may give it) reads as the int.
    if isinstance(block, int):
        assert BFP.from_config({**config, "block": str(block)}) == fmt


def test_format_from_config_falls_back_to_a_default_and_names_bad_keys() -> None:
    default = BFP(6, "kernel", "nearest")
    assert BFP.from_config({"bits": 4}, default) == BFP(4, "kernel", "nearest")
    with pytest.raises(ValueError, match="no 'block'"):
        BFP.from_config({"bits": 4, "rounding": "nearest"})
    with pytest.raises(ValueError, match=r"BFP bits must be in 2\.\.16, got 1"):
        BFP.from_config({"bits": 1}, default)
    with pytest.raises(ValueError, match="block must be one of"):
        BFP.from_config({"block": "-3"}, default)
    with pytest.raises(ValueError, match="rounding must be one of"):
        BFP.from_config({"rounding": "up"}, default)


def test_one_bits_check_for_formats_and_configs() -> None:
    assert check_bits(8) == 8 and check_bits(32, allow_fp32=True) == 32
    with pytest.raises(ValueError, match=r"node bits must be in 2..16 or 32 for FP32, got 20"):
        check_bits(20, what="node bits", allow_fp32=True)
    with pytest.raises(ValueError, match="must be an int"):
        check_bits(True)
    with pytest.raises(ValueError, match=r"must be in 2\.\.16, got 32"):
        check_bits(32)


@pytest.mark.compiled
def test_a_new_thread_count_gets_its_own_kernel_with_identical_results() -> None:
    # Inductor bakes the thread count into the C++ it writes; without its own variant a
    # kernel compiled at one thread would stay serial after torch.set_num_threads(2).
    x = torch.randn(64, 500) * 3
    fmt = BFP(7, "row")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize(x, fmt, seed=11)
        torch.set_num_threads(2)
        two = quantize(x, fmt, seed=11)
    finally:
        torch.set_num_threads(threads)
    variants = kernels.round_values_kernel.variants  # quantize's kernel: values and flag
    assert {(7, True, True, 1), (7, True, True, 2)} <= set(variants)
    assert torch.equal(one, two)
