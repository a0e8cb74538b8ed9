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

Stochastic rounding adds 16 random bits of dither per element, so rounding probabilities
are exact to ``2**-16`` of a step. Everything runs in chunks small enough to stay in the
CPU cache, which is what makes a chain of plain torch ops fast here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from typing import Literal, Union

import torch
from torch import Tensor

BlockKind = Union[Literal["tensor", "row", "kernel"], int]  # noqa: UP007 (runtime alias)
Rounding = Literal["nearest", "stochastic"]

EXPONENT_MIN = -126
EXPONENT_MAX = 127
MIN_BITS = 2
MAX_BITS = 16
_BLOCK_NAMES = ("tensor", "row", "kernel")
# Elements processed per step: 2**16 float32 values (256 KiB) stay in L2 cache, so the
# five or six passes over a chunk cost about one pass over memory.
_CHUNK = 1 << 16
_DITHER_SCALE = 2.0**-16  # an int16 r becomes the dither u = r * 2**-16 + 1/2 + 2**-17,
_DITHER_OFFSET = 0.5 + 2.0**-17  # uniform on the midpoints of [0, 1) cut in 2**16 steps


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
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"BFP bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"BFP bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        check_block(self.block)
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"BFP rounding must be 'nearest' or 'stochastic', got {self.rounding!r}"
            )

    @property
    def max_code(self) -> int:
        """Largest integer code: ``2**(bits-1) - 1`` (the range is symmetric)."""
        return (1 << (self.bits - 1)) - 1


def check_block(block: object) -> None:
    """Raise ValueError unless ``block`` is "tensor", "row", "kernel" or a positive int."""
    if isinstance(block, str):
        if block not in _BLOCK_NAMES:
            raise ValueError(
                f"BFP block must be one of {_BLOCK_NAMES} or a positive int, got {block!r}"
            )
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(
            f"BFP block must be one of {_BLOCK_NAMES} or a positive int, got {block!r}"
        )


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
        largest = torch.maximum(view.amax(dim=1), view.amin(dim=1).neg())
        if not bool(torch.isfinite(largest).all()):
            raise ValueError("cannot quantize a tensor that contains NaN or Inf")
        exps = torch.frexp(largest).exponent - 1
        exps = torch.where(largest > 0, exps, EXPONENT_MIN)
        parts.append(exps.clamp_(EXPONENT_MIN, EXPONENT_MAX).to(torch.int32))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


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


def _round_views(
    src_views: list[Tensor],
    dst_views: list[Tensor],
    exps: Tensor,
    fmt: BFP,
    generator: torch.Generator | None,
    dequantize: bool,
) -> None:
    """Round every block of ``src_views`` onto the grid and write it to ``dst_views``.

    ``dequantize=True`` writes grid values (float); otherwise the integer codes.
    """
    step_exp = exps - (fmt.bits - 2)  # exponent of one step (LSB) per block
    up_exp = -step_exp
    # 2**up_exp can exceed FP32 for tiny blocks at 16 bits: split it into two factors.
    up_hi = up_exp.clamp(max=EXPONENT_MAX)
    up = _pow2(up_hi).unsqueeze(1)
    up_rest = _pow2(up_exp - up_hi).unsqueeze(1) if bool((up_exp > EXPONENT_MAX).any()) else None
    down = _pow2(step_exp).unsqueeze(1) if dequantize else None
    limit = float(fmt.max_code)
    stochastic = fmt.rounding == "stochastic"
    if stochastic:
        dither_words = torch.empty(_CHUNK // 4 + 1, dtype=torch.int64, device=exps.device)
    first_block = 0
    for src, dst in zip(src_views, dst_views, strict=True):
        rows, cols = src.shape
        for r0, r1, c0, c1 in _chunks(rows, cols):
            b0, b1 = first_block + r0, first_block + r1
            y = torch.mul(src[r0:r1, c0:c1], up[b0:b1])
            if up_rest is not None:
                y.mul_(up_rest[b0:b1])
            if stochastic:
                # floor(y + u), u ~ U(0, 1): split y into floor and fraction first, so the
                # sum with the dither is exact however large y is.
                whole = torch.floor(y)
                y.sub_(whole)
                count = y.numel()
                words = dither_words[: (count + 3) // 4]
                words.random_(-(2**63), 2**63 - 1, generator=generator)
                dither = words.view(torch.int16)[:count].view(y.shape)
                y.add_(dither, alpha=_DITHER_SCALE).add_(_DITHER_OFFSET).floor_().add_(whole)
            else:
                y.round_()
            y.clamp_(-limit, limit)
            if down is not None:
                torch.mul(y, down[b0:b1], out=dst[r0:r1, c0:c1])
            else:
                dst[r0:r1, c0:c1].copy_(y)
        first_block += rows


def _as_float32_flat(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"BFP quantizes floating tensors, got dtype {x.dtype}")
    return x.detach().to(torch.float32).contiguous().view(-1)


def quantize(x: Tensor, fmt: BFP, generator: torch.Generator | None = None) -> Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, values on the BFP grid.

    Arithmetic is float32 (inputs of other float dtypes are converted, then back). Not
    differentiable: the result is detached. Stochastic rounding draws from ``generator``
    (or torch's default generator). Raises ValueError on NaN or Inf.
    """
    flat = _as_float32_flat(x)
    out = torch.empty_like(flat)
    _quantize_flat(flat, out, tuple(x.shape), fmt, generator)
    return out.view(x.shape).to(x.dtype)


def quantize_(x: Tensor, fmt: BFP, generator: torch.Generator | None = None) -> Tensor:
    """In-place :func:`quantize` of a contiguous float32 tensor; returns ``x``."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        with torch.no_grad():
            return x.copy_(quantize(x, fmt, generator))
    with torch.no_grad():
        flat = x.view(-1)
        _quantize_flat(flat, flat, tuple(x.shape), fmt, generator)
    return x


def _quantize_flat(
    flat: Tensor, out: Tensor, shape: tuple[int, ...], fmt: BFP, gen: torch.Generator | None
) -> None:
    layout = block_layout(shape, fmt.block)
    src = _block_views(flat, layout)
    exps = block_exponents(src)
    _round_views(src, _block_views(out, layout), exps, fmt, gen, dequantize=True)


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
