"""Block floating point (BFP): the format spec, fake quantization and integer codes.

A block is a set of values sharing one exponent ``e = floor(log2(max|x|))``. Each value
is stored as a ``bits``-bit signed integer ``i = round(x * 2**(bits - 2 - e))`` so the
block's largest magnitude lands in ``[2**(bits-2), 2**(bits-1))``, and it is read back as
``i * 2**(e - (bits - 2))``. This is the SWALP / LPT-FL quantizer with three deliberate
departures, all documented in the README:

* the integer range is symmetric, ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``: with the
  paper's ``-2**(bits-1)`` a negative block maximum could round onto the next power of
  two, raise the block's exponent and move every other value when quantized again. With
  the symmetric range quantization is idempotent, so weights trained on the grid cross
  the wire untouched;
* an all-zero block stays exactly zero (no ``±1e-10`` clamp before ``log2``);
* exponents are clamped to FP32's normal range ``[-126, 127]`` (SWALP: ``[-128, 127]``),
  which only differs for blocks whose largest magnitude is below ``2**-126``.

Stochastic rounding adds an odd 16-bit dither per element (15 random bits), so rounding
probabilities are exact to within ``2**-15``; activations and errors may use an 8-bit
dither (7 random bits, ``2**-7``), half the random numbers. Everything runs in chunks
small enough to stay in the CPU cache, which is what makes a chain of plain torch ops fast
here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from typing import Literal, Union

import numpy as np
import torch
from torch import Tensor

BlockKind = Union[Literal["tensor", "row", "kernel"], int]  # noqa: UP007 (runtime alias)
Rounding = Literal["nearest", "stochastic"]

EXPONENT_MIN = -126
EXPONENT_MAX = 127
MIN_BITS = 2
MAX_BITS = 16
FP32_BITS = 32  # where a config accepts FP32, it is spelled as this bit width
BLOCK_NAMES = ("tensor", "row", "kernel")
ROUNDINGS = ("nearest", "stochastic")
# Elements processed per step: 2**16 float32 values (256 KiB) stay in L2 cache, so the
# five or six passes over a chunk cost about one pass over memory.
_CHUNK = 1 << 18
# The dither is an odd integer r of 16 (or 8) bits: r * 2**-16 lies strictly inside
# (-1/2, 1/2), so a value already on the grid never meets a tie, and r * 2**-16 + 1/2 lies
# strictly inside (0, 1).
DITHER_BITS = (8, 16)
_DITHER_OFFSET = 0.5
_ODD_LANES = {16: np.uint64(0x0001_0001_0001_0001), 8: np.uint64(0x0101_0101_0101_0101)}
_LANE_DTYPES = {16: (np.int16, torch.int16), 8: (np.int8, torch.int8)}


@dataclass(frozen=True)
class BFP:
    """A block-floating-point format: ``bits`` per value, one 8-bit exponent per block.

    Args:
        bits: word length of each value's signed integer, 2..16.
        block: which values share an exponent. ``"tensor"``: the whole tensor;
            ``"row"``: each slice along dim 0 (output channel / row); ``"kernel"``: each
            ``(dim0, dim1)`` slice (the paper's "BC": one per 3x3 kernel of a conv, one per
            element of a Linear weight); an int ``k``: runs of ``k`` consecutive elements
            (as in the MX formats). Tensors of fewer than 2 dims use one exponent for
            ``"row"`` and ``"kernel"``.
        rounding: ``"stochastic"`` (unbiased, the paper's default) or ``"nearest"``
            (ties to even).
    """

    bits: int
    block: BlockKind = "row"
    rounding: Rounding = "stochastic"

    def __post_init__(self) -> None:
        check_bits(self.bits, what="BFP bits")
        check_block(self.block)
        check_rounding(self.rounding)

    @property
    def max_code(self) -> int:
        """Largest integer code: ``2**(bits-1) - 1`` (the range is symmetric)."""
        return (1 << (self.bits - 1)) - 1

    def to_config(self) -> dict[str, int | str]:
        """The format as flat scalars, ``{"bits", "block", "rounding"}``.

        Every value is an int or a str, so the dict fits a Flower ``ConfigRecord``, a run
        config or JSON; :meth:`from_config` reads it back. An int block stays an int.
        """
        return {"bits": self.bits, "block": self.block, "rounding": self.rounding}

    @classmethod
    def from_config(cls, config: Mapping[str, object], default: BFP | None = None) -> BFP:
        """The format written by :meth:`to_config`; missing keys come from ``default``.

        ``block`` may also be a decimal string (``"32"``), as a TOML or command-line
        value can be. Raises ValueError naming the key whose value is not usable.
        """
        fields = {}
        for key in ("bits", "block", "rounding"):
            if key in config:
                fields[key] = config[key]
            elif default is not None:
                fields[key] = getattr(default, key)
            else:
                raise ValueError(f"BFP config has no {key!r} and there is no default")
        return cls(
            bits=check_bits(fields["bits"], what="BFP bits"),
            block=parse_block(fields["block"]),
            rounding=check_rounding(fields["rounding"]),
        )


def check_bits(bits: object, *, what: str = "bits", allow_fp32: bool = False) -> int:
    """``bits`` as an int if it is a BFP word length (2..16), or 32 when ``allow_fp32``.

    The one check of a bit width: formats, run and node configs, and the wire decoder
    all call it. Raises ValueError naming ``what``.
    """
    fp32 = " or 32 for FP32" if allow_fp32 else ""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an int in {MIN_BITS}..{MAX_BITS}{fp32}, got {bits!r}")
    if not (MIN_BITS <= bits <= MAX_BITS or (allow_fp32 and bits == FP32_BITS)):
        raise ValueError(f"{what} must be in {MIN_BITS}..{MAX_BITS}{fp32}, got {bits}")
    return bits


def check_block(block: object) -> None:
    """Raise ValueError unless ``block`` is "tensor", "row", "kernel" or a positive int."""
    if isinstance(block, str):
        if block not in BLOCK_NAMES:
            raise ValueError(
                f"BFP block must be one of {BLOCK_NAMES} or a positive int, got {block!r}"
            )
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"BFP block must be one of {BLOCK_NAMES} or a positive int, got {block!r}")


def parse_block(block: object) -> BlockKind:
    """A block kind from a config value: a name, a positive int, or an int as a decimal string."""
    if isinstance(block, str) and block.isdecimal():
        block = int(block)
    check_block(block)
    return block  # type: ignore[return-value]


def check_rounding(rounding: object) -> Rounding:
    """``rounding`` if it is "nearest" or "stochastic"; else ValueError."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"BFP rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding  # type: ignore[return-value]


def block_layout(shape: tuple[int, ...] | list[int], block: BlockKind) -> list[tuple[int, int]]:
    """Blocks of a tensor of ``shape`` as runs ``(num_blocks, block_size)`` in memory order.

    Every layout is at most two runs: equal blocks, then (for int ``k`` that does not
    divide the size) one shorter tail block. An empty tensor has no blocks.
    """
    numel = prod(shape)
    if numel == 0:
        return []
    if block == "tensor" or (block in ("row", "kernel") and len(shape) < 2):
        return [(1, numel)]
    if block == "row":
        return [(shape[0], numel // shape[0])]
    if block == "kernel":
        kernels = shape[0] * shape[1]
        return [(kernels, numel // kernels)]
    assert isinstance(block, int)
    full, tail = divmod(numel, block)
    runs = [(full, block)] if full else []
    if tail:
        runs.append((1, tail))
    return runs


def num_blocks(shape: tuple[int, ...] | list[int], block: BlockKind) -> int:
    """Number of exponents a tensor of ``shape`` carries under ``block``."""
    return sum(count for count, _ in block_layout(shape, block))


def _block_views(flat: Tensor, layout: list[tuple[int, int]]) -> list[Tensor]:
    """Split a flat contiguous tensor into 2-D ``[num_blocks, block_size]`` views."""
    views, start = [], 0
    for count, size in layout:
        views.append(flat[start : start + count * size].view(count, size))
        start += count * size
    return views


def _pow2(k: Tensor) -> Tensor:
    """Exact ``2.0**k`` in float32 for int32 ``k`` in [-149, 127], built from its bits."""
    normal = (k + 127).clamp(min=1).bitwise_left_shift(23)
    subnormal = torch.ones_like(k).bitwise_left_shift((k + 149).clamp(0, 22))
    return torch.where(k >= EXPONENT_MIN, normal, subnormal).view(torch.float32)


def block_exponents(views: list[Tensor]) -> Tensor:
    """Shared exponent ``floor(log2(max|x|))`` of every block, int32 ``[total_blocks]``.

    All-zero blocks get ``EXPONENT_MIN``. Raises ValueError on NaN or Inf.
    """
    parts = []
    for view in views:
        if view.shape[0] == 1:  # one block (activations): Python scalars beat tiny kernels
            parts.append(torch.tensor([_scalar_exponent(view)], dtype=torch.int32))
            continue
        largest = torch.maximum(view.amax(dim=1), view.amin(dim=1).neg())
        if not bool(torch.isfinite(largest).all()):
            raise ValueError("cannot quantize a tensor that contains NaN or Inf")
        exps = torch.frexp(largest).exponent - 1
        exps = torch.where(largest > 0, exps, EXPONENT_MIN)
        parts.append(exps.clamp_(EXPONENT_MIN, EXPONENT_MAX).to(torch.int32))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def _scalar_exponent(view: Tensor) -> int:
    low, high = torch.aminmax(view)  # one pass over the data (amax + amin would be two)
    largest = max(high.item(), -low.item())
    if not math.isfinite(largest):
        raise ValueError("cannot quantize a tensor that contains NaN or Inf")
    if largest == 0:
        return EXPONENT_MIN
    return min(max(math.frexp(largest)[1] - 1, EXPONENT_MIN), EXPONENT_MAX)


def _chunks(rows: int, cols: int) -> Iterator[tuple[int, int, int, int]]:
    """Tiles ``(r0, r1, c0, c1)`` of about ``_CHUNK`` elements covering a rows x cols view."""
    if cols >= _CHUNK:
        for r in range(rows):
            for c0 in range(0, cols, _CHUNK):
                yield r, r + 1, c0, min(c0 + _CHUNK, cols)
    else:
        step = _CHUNK // cols
        for r0 in range(0, rows, step):
            yield r0, min(r0 + step, rows), 0, cols


Factor = Union[Tensor, float]  # noqa: UP007 (runtime alias)
# Step exponents for which the magic-number rounding is exact and its constants are
# normal float32 numbers (including ``step * 2**-16``).
_MAGIC_STEP_EXPONENTS = (-110, 104)


def _block_factors(exps: Tensor, bits: int) -> tuple[Factor, Factor | None, Factor]:
    """Per-block ``(up, up_rest, down)``: grid -> integers is ``x * up * up_rest``,
    integers -> grid is ``i * down``. Columns ``[B, 1]``, or floats for a single block.

    ``2**(bits - 2 - e)`` exceeds FP32 for tiny blocks at high bit widths, so it is split
    into two exact factors; ``up_rest`` is None when no block needs the second one.
    """
    if exps.numel() == 1:
        up_exp = bits - 2 - int(exps[0])
        rest = math.ldexp(1.0, up_exp - EXPONENT_MAX) if up_exp > EXPONENT_MAX else None
        return math.ldexp(1.0, min(up_exp, EXPONENT_MAX)), rest, math.ldexp(1.0, -up_exp)
    up_exp = (bits - 2) - exps
    up_hi = up_exp.clamp(max=EXPONENT_MAX)
    up_rest = _pow2(up_exp - up_hi).unsqueeze(1) if bool((up_exp > EXPONENT_MAX).any()) else None
    return _pow2(up_hi).unsqueeze(1), up_rest, _pow2(-up_exp).unsqueeze(1)


class _Dither:
    """Odd integers of ``bits`` bits (``bits - 1`` random ones), reproducible from a generator.

    On the CPU they come from NumPy's SFC64, seeded by one draw from ``generator``: that
    bit generator makes 64 random bits about twice as fast as torch's MT19937, and the
    random bits are the largest cost of stochastic rounding.
    """

    def __init__(
        self, generator: torch.Generator | None, device: torch.device, bits: int = 16
    ) -> None:
        if bits not in DITHER_BITS:
            raise ValueError(f"dither_bits must be one of {DITHER_BITS}, got {bits!r}")
        self.generator, self.device, self.lane_bits = generator, device, bits
        self.scale = 2.0**-bits  # r * scale lies strictly inside (-1/2, 1/2)
        if device.type == "cpu":
            seed = torch.randint(0, 2**63 - 1, (1,), generator=generator).item()
            self.bits = np.random.SFC64(seed)

    def draw(self, count: int) -> Tensor:
        """``count`` odd values, uniform over ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``."""
        per_word = 64 // self.lane_bits
        words = (count + per_word - 1) // per_word
        np_dtype, torch_dtype = _LANE_DTYPES[self.lane_bits]
        if self.device.type == "cpu":
            raw = self.bits.random_raw(words)
            raw |= _ODD_LANES[self.lane_bits]
            return torch.from_numpy(raw.view(np_dtype)[:count])
        lanes = torch.empty(words, dtype=torch.int64, device=self.device)
        lanes.random_(-(2**63), 2**63 - 1, generator=self.generator)
        lanes.bitwise_or_(int(_ODD_LANES[self.lane_bits].astype(np.int64)))
        return lanes.view(torch_dtype)[:count]


def _rows(factor: Factor, b0: int, b1: int) -> Factor:
    return factor if isinstance(factor, float) else factor[b0:b1]


def _round_views(
    src_views: list[Tensor],
    dst_views: list[Tensor],
    exps: Tensor,
    fmt: BFP,
    generator: torch.Generator | None,
    dequantize: bool,
    dither_bits: int = 16,
) -> None:
    """Round every block of ``src_views`` onto the grid and write it to ``dst_views``.

    ``dequantize=True`` writes grid values (float); otherwise the integer codes.
    """
    stochastic = fmt.rounding == "stochastic"
    dither = _Dither(generator, exps.device, dither_bits) if stochastic else None
    step_exps = (int(exps.min()), int(exps.max())) if exps.numel() else (0, 0)
    step_exps = (step_exps[0] - (fmt.bits - 2), step_exps[1] - (fmt.bits - 2))
    if (
        dequantize
        and (dither is None or fmt.bits <= 8)
        and _MAGIC_STEP_EXPONENTS[0] <= step_exps[0]
        and step_exps[1] <= _MAGIC_STEP_EXPONENTS[1]
    ):
        _round_onto_grid(src_views, dst_views, exps, fmt, dither)
        return
    up, up_rest, down = _block_factors(exps, fmt.bits)
    limit = float(fmt.max_code)
    first_block = 0
    for src, dst in zip(src_views, dst_views, strict=True):
        rows, cols = src.shape
        for r0, r1, c0, c1 in _chunks(rows, cols):
            b0, b1 = first_block + r0, first_block + r1
            y = torch.mul(src[r0:r1, c0:c1], _rows(up, b0, b1))
            if up_rest is not None:
                y.mul_(_rows(up_rest, b0, b1))
            if dither is not None:
                noise = dither.draw(y.numel()).view(y.shape)
                if fmt.bits <= 8:
                    # |y| < 2**7, so y + r * 2**-16 is exact in float32: round it.
                    y.add_(noise, alpha=dither.scale).round_()
                else:
                    # Wider codes leave fewer fraction bits: floor(frac(y) + u) + floor(y).
                    whole = torch.floor(y)
                    y.sub_(whole).add_(noise, alpha=dither.scale).add_(_DITHER_OFFSET)
                    y.floor_().add_(whole)
            else:
                y.round_()
            y.clamp_(-limit, limit)
            if dequantize:
                torch.mul(y, _rows(down, b0, b1), out=dst[r0:r1, c0:c1])
            else:
                dst[r0:r1, c0:c1].copy_(y)
        first_block += rows


def _round_onto_grid(
    src_views: list[Tensor],
    dst_views: list[Tensor],
    exps: Tensor,
    fmt: BFP,
    dither: _Dither | None,
) -> None:
    """Fast path of :func:`_round_views` for grid values: round in value units.

    Adding ``1.5 * 2**23 * step`` leaves exactly the multiples of ``step`` representable,
    so one add and one subtract round to the grid (ties to even) with no scaling passes;
    the dither ``r * step * 2**-16`` is added first, exactly for ``bits <= 8``.
    """
    if exps.numel() == 1:
        step_exp = int(exps[0]) - (fmt.bits - 2)
        step: Factor = math.ldexp(1.0, step_exp)
        magic: Factor = math.ldexp(1.5, step_exp + 23)
        top: Factor = fmt.max_code * step
    else:
        step_exps = exps - (fmt.bits - 2)
        step = _pow2(step_exps).unsqueeze(1)
        magic = _pow2(step_exps + 23).unsqueeze(1).mul_(1.5)
        top = step * fmt.max_code
    first_block = 0
    for src, dst in zip(src_views, dst_views, strict=True):
        rows, cols = src.shape
        for r0, r1, c0, c1 in _chunks(rows, cols):
            b0, b1 = first_block + r0, first_block + r1
            x, out = src[r0:r1, c0:c1], dst[r0:r1, c0:c1]
            row_magic = _rows(magic, b0, b1)
            if dither is not None:
                noise = dither.draw(x.numel()).view(x.shape)
                if isinstance(step, float):
                    torch.add(x, noise, alpha=step * dither.scale, out=out)
                else:
                    torch.addcmul(x, noise, step[b0:b1], value=dither.scale, out=out)
                out.add_(row_magic)
            else:
                torch.add(x, row_magic, out=out)
            out.sub_(row_magic)
            if isinstance(top, float):
                out.clamp_(-top, top)
            else:
                row_top = top[b0:b1]
                torch.clamp(out, min=-row_top, max=row_top, out=out)
        first_block += rows


def _as_float32_flat(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"BFP quantizes floating tensors, got dtype {x.dtype}")
    return x.detach().to(torch.float32).contiguous().view(-1)


def quantize(
    x: Tensor, fmt: BFP, generator: torch.Generator | None = None, *, dither_bits: int = 16
) -> Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, values on the BFP grid.

    Arithmetic is float32 (inputs of other float dtypes are converted, then back). Not
    differentiable: the result is detached. Stochastic rounding draws from ``generator``
    (or torch's default generator) ``dither_bits`` (16 or 8) per element, of which all but
    one are random: rounding probabilities are exact to ``2**-15`` (or ``2**-7``). Raises
    ValueError on NaN or Inf.
    """
    flat = _as_float32_flat(x)
    out = torch.empty_like(flat)
    _quantize_flat(flat, out, tuple(x.shape), fmt, generator, dither_bits)
    return out.view(x.shape).to(x.dtype)


def quantize_(
    x: Tensor, fmt: BFP, generator: torch.Generator | None = None, *, dither_bits: int = 16
) -> Tensor:
    """In-place :func:`quantize` of a contiguous float32 tensor; returns ``x``."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        with torch.no_grad():
            return x.copy_(quantize(x, fmt, generator, dither_bits=dither_bits))
    with torch.no_grad():
        flat = x.view(-1)
        _quantize_flat(flat, flat, tuple(x.shape), fmt, generator, dither_bits)
    return x


def _quantize_flat(
    flat: Tensor,
    out: Tensor,
    shape: tuple[int, ...],
    fmt: BFP,
    gen: torch.Generator | None,
    dither_bits: int = 16,
) -> None:
    if dither_bits not in DITHER_BITS:
        raise ValueError(f"dither_bits must be one of {DITHER_BITS}, got {dither_bits!r}")
    layout = block_layout(shape, fmt.block)
    src = _block_views(flat, layout)
    exps = block_exponents(src)
    _round_views(src, _block_views(out, layout), exps, fmt, gen, True, dither_bits)


def encode_codes(
    x: Tensor, fmt: BFP, generator: torch.Generator | None = None, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Integer codes and exponents of ``x`` in ``fmt``.

    Returns ``(codes, exponents)``: codes ``[numel]`` (int8 for bits <= 8, else int16, or
    written into ``out`` when given) and exponents int8 ``[num_blocks]``.
    """
    flat = _as_float32_flat(x)
    layout = block_layout(tuple(x.shape), fmt.block)
    code_dtype = torch.int8 if fmt.bits <= 8 else torch.int16
    if out is None:
        out = torch.empty(flat.numel(), dtype=code_dtype)
    elif out.dtype != code_dtype or out.numel() != flat.numel():
        raise ValueError(f"out must be {code_dtype} with {flat.numel()} elements")
    src = _block_views(flat, layout)
    exps = block_exponents(src)
    _round_views(src, _block_views(out, layout), exps, fmt, generator, dequantize=False)
    return out, exps.to(torch.int8)


def decode_codes(
    codes: Tensor, exponents: Tensor, shape: tuple[int, ...], bits: int, block: BlockKind
) -> Tensor:
    """Float32 tensor of ``shape`` from integer ``codes`` ``[numel]`` and block exponents."""
    layout = block_layout(shape, block)
    out = torch.empty(prod(shape), dtype=torch.float32)
    step = _pow2(exponents.to(torch.int32) - (bits - 2)).unsqueeze(1)
    first_block = 0
    for src, dst in zip(_block_views(codes, layout), _block_views(out, layout), strict=True):
        rows, cols = src.shape
        for r0, r1, c0, c1 in _chunks(rows, cols):
            b0, b1 = first_block + r0, first_block + r1
            torch.mul(src[r0:r1, c0:c1], step[b0:b1], out=dst[r0:r1, c0:c1])
        first_block += rows
    return out.view(shape)
