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

Stochastic rounding adds a dither of 23 random bits per element from a counter-based
stream (a hash of the element's index and a seed drawn from the caller's generator), so
rounding probabilities are exact to ``2**-23`` and results depend only on the seed, not
on the device or on how tensors are batched. The rounding itself is one kernel
(:mod:`fedlpt.quant.kernels`), compiled by ``torch.compile`` where possible.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Literal, Union

import torch
from torch import Tensor

from .kernels import (
    EXPONENT_MAX,
    EXPONENT_MIN,
    power_of_two,
    round_block_list_inplace_kernel,
    round_block_list_kernel,
    round_blocks_kernel,
    round_values_kernel,
)

BlockKind = Union[Literal["tensor", "row", "kernel"], int]  # noqa: UP007 (runtime alias)
Rounding = Literal["nearest", "stochastic"]

MIN_BITS = 2
MAX_BITS = 16
FP32_BITS = 32  # where a config accepts FP32, it is spelled as this bit width
BLOCK_NAMES = ("tensor", "row", "kernel")
ROUNDINGS = ("nearest", "stochastic")
_SEED_BITS = 31  # seeds are non-negative int32 values
_SEED_DRAW = threading.local()  # one reused scalar per thread for CPU seed draws


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


def _as_float32_flat(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float32 and x.is_contiguous():
        return x.detach().view(-1)  # the common case, without two more dispatches
    if not x.is_floating_point():
        raise TypeError(f"BFP quantizes floating tensors, got dtype {x.dtype}")
    return x.detach().to(torch.float32).contiguous().view(-1)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed for the dither, drawn from ``generator`` (torch's default if None).

    An accelerator's generator is advanced on the host (its Philox offset), so drawing a
    seed never waits for the device.
    """
    generator = torch.default_generator if generator is None else generator
    if generator.device.type == "cpu":
        # The same draw as torch.randint(0, 2**31, (1,)), into a reused scalar: half the cost.
        draw = getattr(_SEED_DRAW, "tensor", None)
        if draw is None:
            draw = _SEED_DRAW.tensor = torch.empty((), dtype=torch.int64)
        return int(draw.random_(0, 1 << _SEED_BITS, generator=generator))
    try:
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        return stream_seed(generator.initial_seed(), offset)
    except (AttributeError, RuntimeError):
        pass  # a generator without offsets: draw on its device
    draw = torch.randint(0, 1 << _SEED_BITS, (1,), generator=generator, device=generator.device)
    return int(draw.item())


def stream_seed(seed: int, stream: int) -> int:
    """The seed of sub-stream ``stream`` of ``seed`` (a SplitMix64 step, 31 bits kept)."""
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> (64 - _SEED_BITS)


def _check_finite(finite: Tensor) -> None:
    """Raise ValueError if the kernel flagged a NaN or Inf (reads the flag: a sync on a GPU)."""
    if not bool(finite):
        raise ValueError("cannot quantize a tensor that contains NaN or Inf")


def _round_flat(
    flat: Tensor, shape: tuple[int, ...], fmt: BFP, seed: int, codes: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(rounded [numel], exponents [blocks], finite)`` of a flat float32 tensor."""
    layout = block_layout(shape, fmt.block)
    stochastic = fmt.rounding == "stochastic"
    if not layout:
        empty = torch.empty(0, dtype=torch.int32, device=flat.device)
        kind = (torch.int8 if fmt.bits <= 8 else torch.int16) if codes else flat.dtype
        return flat.to(kind), empty, torch.ones((), dtype=torch.bool, device=flat.device)
    # Even a 128-value tensor rounds about 5x faster through the compiled kernel than
    # through the same code run eagerly (about 30 small ops, 2 us each on the CPU).
    static = (fmt.bits, stochastic, codes)
    if len(layout) == 1:
        # Every tensor but one with a ragged last block: no slicing, no concatenation
        # (each dispatch is a microsecond or two, a tenth of a small tensor's call).
        count, size = layout[0]
        rounded, exponent, finite = round_blocks_kernel(
            flat.view(count, size), seed, 0, static=static
        )
        return rounded.view(-1), exponent, finite
    parts, exponents, flags, offset = [], [], [], 0
    for view in _block_views(flat, layout):
        rounded, exponent, finite = round_blocks_kernel(view, seed, offset, static=static)
        parts.append(rounded.reshape(-1))
        exponents.append(exponent)
        flags.append(finite)
        offset += view.numel()
    if len(parts) == 1:
        return parts[0], exponents[0], flags[0]
    return torch.cat(parts), torch.cat(exponents), torch.stack(flags).all()


def quantize(
    x: Tensor,
    fmt: BFP,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    check: bool = True,
) -> Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, values on the BFP grid.

    Arithmetic is float32 (inputs of other float dtypes are converted, then back). Not
    differentiable: the result is detached. Stochastic rounding draws a seed from
    ``generator`` (or uses ``seed``); ``quantize(x, f, g)`` equals
    ``quantize_tensors([x], f, g)[0]`` for generators in the same state.

    Args:
        check: raise ValueError on NaN or Inf. It reads a flag back from the device;
            the training hot path passes False and lets a NaN show in the loss instead.
    """
    flat = _as_float32_flat(x)
    seed = stream_seed(draw_seed(generator), 0) if seed is None else seed
    layout = block_layout(x.shape, fmt.block)
    if len(layout) == 1:
        # Equal blocks, the common case: the kernel that returns the values (and the
        # flag if checked) alone; every output costs a small call a few microseconds.
        static = (fmt.bits, fmt.rounding == "stochastic", check)
        out, finite = round_values_kernel(flat.view(layout[0]), seed, static=static)
    else:
        out, _, finite = _round_flat(flat, tuple(x.shape), fmt, seed, codes=False)
    if check:
        _check_finite(finite)
    # view_as, not view(x.shape): parsing a torch.Size costs three times as long.
    out = out.view_as(x)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def quantize_(
    x: Tensor,
    fmt: BFP,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    check: bool = True,
) -> Tensor:
    """In-place :func:`quantize`; returns ``x``."""
    with torch.no_grad():
        return x.copy_(quantize(x, fmt, generator, seed=seed, check=check))


def _batched_blocks(
    tensors: Sequence[Tensor], flats: Sequence[Tensor], fmt: BFP, base: int
) -> tuple[list[Tensor], list[int], list[int], list[int]]:
    """Block views of every flat tensor with their seeds, offsets and owners' indices.

    Tensor ``i`` uses the stream ``stream_seed(base, i)``; its views count their
    offsets from its first element.
    """
    views, seeds, offsets, owners = [], [], [], []
    for index, (tensor, flat) in enumerate(zip(tensors, flats, strict=True)):
        seed, offset = stream_seed(base, index), 0
        for view in _block_views(flat, block_layout(tuple(tensor.shape), fmt.block)):
            views.append(view)
            seeds.append(seed)
            offsets.append(offset)
            owners.append(index)
            offset += view.numel()
    return views, seeds, offsets, owners


def quantize_tensors(
    tensors: Sequence[Tensor],
    fmt: BFP,
    generator: torch.Generator | None = None,
    *,
    check: bool = True,
) -> list[Tensor]:
    """:func:`quantize` of every tensor, in one call that batches the small ones.

    Same order and same results as quantizing each alone: tensor ``i`` uses the stream
    ``stream_seed(s, i)`` of one seed ``s`` drawn from ``generator``, i.e. it equals
    ``quantize(tensors[i], fmt, seed=stream_seed(s, i))``.
    """
    base = draw_seed(generator)
    flats = [_as_float32_flat(t) for t in tensors]
    views, seeds, offsets, owners = _batched_blocks(tensors, flats, fmt, base)
    stochastic = fmt.rounding == "stochastic"
    if views:
        rounded, finite = round_block_list_kernel(
            views, seeds, offsets, static=(fmt.bits, stochastic)
        )
        if check:
            _check_finite(finite)
    else:
        rounded = []
    pieces: list[list[Tensor]] = [[] for _ in tensors]
    for owner, piece in zip(owners, rounded, strict=True):
        pieces[owner].append(piece.reshape(-1))
    results = []
    for tensor, flat, parts in zip(tensors, flats, pieces, strict=True):
        out = flat.clone() if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)
        results.append(out.view(tensor.shape).to(tensor.dtype))
    return results


def quantize_tensors_(
    tensors: Sequence[Tensor],
    fmt: BFP,
    generator: torch.Generator | None = None,
    *,
    check: bool = True,
) -> None:
    """In-place :func:`quantize_tensors` (the same draws, the same results).

    Unchecked (``check=False``, the training hot path), float32 tensors that are
    contiguous and share no memory are rounded where they lie: compiled, straight into
    their memory, with nothing allocated or copied back. Anything else goes through
    :func:`quantize_tensors` and is copied back.
    """
    if not tensors:
        return
    if check or not _writable_in_place(tensors):
        rounded = quantize_tensors(tensors, fmt, generator, check=check)
        with torch.no_grad():
            torch._foreach_copy_(list(tensors), rounded)
        return
    base = draw_seed(generator)
    flats = [t.detach().view(-1) for t in tensors]
    views, seeds, offsets, _ = _batched_blocks(tensors, flats, fmt, base)
    if views:
        round_block_list_inplace_kernel(
            views, seeds, offsets, static=(fmt.bits, fmt.rounding == "stochastic")
        )


def _writable_in_place(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is float32, contiguous and alone on its storage among them."""
    storages = set()
    for tensor in tensors:
        if not isinstance(tensor, Tensor) or tensor.dtype != torch.float32:
            return False
        if not tensor.is_contiguous():
            return False
        storages.add(tensor.untyped_storage().data_ptr())
    return len(storages) == len(tensors)


def encode_codes(
    x: Tensor,
    fmt: BFP,
    generator: torch.Generator | None = None,
    out: Tensor | None = None,
    *,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Integer codes and exponents of ``x`` in ``fmt``, on ``x``'s device.

    Returns ``(codes, exponents)``: codes ``[numel]`` (int8 for bits <= 8, else int16, or
    written into ``out`` when given) and exponents int8 ``[num_blocks]``. Decoding them
    gives exactly ``quantize(x, fmt, seed=...)`` for the same seed. Raises ValueError on
    NaN or Inf.
    """
    flat = _as_float32_flat(x)
    code_dtype = torch.int8 if fmt.bits <= 8 else torch.int16
    if out is not None and (out.dtype != code_dtype or out.numel() != flat.numel()):
        raise ValueError(f"out must be {code_dtype} with {flat.numel()} elements")
    seed = stream_seed(draw_seed(generator), 0) if seed is None else seed
    codes, exponents, finite = _round_flat(flat, tuple(x.shape), fmt, seed, codes=True)
    _check_finite(finite)
    if out is not None:
        out.copy_(codes)
        codes = out
    return codes, exponents.to(torch.int8)


def decode_codes(
    codes: Tensor, exponents: Tensor, shape: tuple[int, ...], bits: int, block: BlockKind
) -> Tensor:
    """Float32 tensor of ``shape`` from integer ``codes`` ``[numel]`` and block exponents."""
    layout = block_layout(shape, block)
    out = torch.empty(prod(shape), dtype=torch.float32, device=codes.device)
    up = (bits - 2) - exponents.to(device=codes.device, dtype=torch.int32).view(-1, 1)
    up_high = up.clamp(EXPONENT_MIN, EXPONENT_MAX - 1)
    down_low, down_high = power_of_two(up_high - up), power_of_two(-up_high)
    first = 0
    for src, dst in zip(_block_views(codes, layout), _block_views(out, layout), strict=True):
        rows = slice(first, first + src.shape[0])
        # Convert in place, then scale in place: a promoting multiply would allocate a
        # float copy of the codes first (measured: 2.5x a clone instead of about 1x).
        dst.copy_(src).mul_(down_low[rows]).mul_(down_high[rows])
        first += src.shape[0]
    return out.view(shape)
