"""The BFP rounding kernel: one implementation, compiled where it can be, eager where not.

:func:`round_blocks` takes a tensor viewed as ``[blocks, block_size]`` and, in a couple
of fused kernels, finds each block's shared exponent, scales onto the integer grid,
rounds (to nearest even, or stochastically with a counter-based dither), clamps to the
symmetric range and scales back (or returns the integer codes). ``torch.compile``
turns the same code into C++/OpenMP on the CPU and Triton on a GPU; where compilation is
unavailable (no compiler on a device, an unsupported backend) the identical code runs
eagerly, chosen automatically and logged once. ``FEDLPT_EAGER=1`` forces eager mode.

The dither of element ``i`` of a call with seed ``s`` is a hash of ``(i, s)``: 23 random
bits plus one half, so rounding probabilities are exact to ``2**-23``, a value already on
the grid never moves (the dither lies strictly inside (0, 1)), and the stream is the
same wherever the tensor lives and however it is batched. Nothing on the hot path reads
a value back to the host: the finiteness flag is returned as a tensor for the caller to
check when it can afford a synchronization.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

EXPONENT_MIN = -126
EXPONENT_MAX = 127
DITHER_BITS = 23  # random bits per element
_HASH = (0x2C1B3C6D, 0x297A2D39, 0x7FEB352D)  # odd multipliers below 2**31
_LOG = logging.getLogger(__name__)
_RECOMPILE_LIMIT = 64


def dither(index: Tensor, seed: int) -> Tensor:
    """Uniform values in (0, 1), 23 random bits each, from int32 element indices and a seed.

    A 32-bit integer hash (xor-shift and multiply, three rounds) in int32 lanes, with
    wrap-around multiplication and logical shifts done by masking.
    """
    # The seed is mixed in by xor before any multiplication: a compiler then has no
    # product of the (affine) index and a constant to fold into an out-of-range literal.
    h = (index ^ seed) * _HASH[0]
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _HASH[1]
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _HASH[2]
    h = h ^ ((h >> 16) & 0xFFFF)
    top = (h >> (32 - DITHER_BITS)) & ((1 << DITHER_BITS) - 1)
    return (top.to(torch.float32) + 0.5) * (2.0**-DITHER_BITS)


def power_of_two(exponent: Tensor) -> Tensor:
    """Exactly ``2.0**exponent`` in float32 for int32 ``exponent`` in [-126, 127]."""
    return ((exponent + 127) << 23).view(torch.float32)


def _round_scaled(
    x: Tensor, seed: int, offset: int, bits: int, stochastic: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The arithmetic of :func:`round_blocks`: ``(rounded, up_low, up_high, exponent,
    finite)``, where ``rounded`` holds the integer codes as float32 and a value is
    ``rounded * 2**-up_low * 2**-up_high``."""
    largest = x.abs().amax(dim=1, keepdim=True)
    finite = torch.isfinite(largest).all()
    # floor(log2(largest)) read from the float's exponent field: exact. Zero blocks and
    # subnormal maxima get the smallest exponent; an Inf or NaN block is flagged.
    exponent = ((largest.view(torch.int32) >> 23) & 0xFF) - 127
    exponent = exponent.clamp(EXPONENT_MIN, EXPONENT_MAX)
    # Values scale onto the integers by 2**up, split in two exact factors so that tiny
    # blocks at wide words do not overflow float32.
    up = (bits - 2) - exponent
    up_high = up.clamp(EXPONENT_MIN, EXPONENT_MAX - 1)
    up_low = up - up_high
    scaled = x * power_of_two(up_high) * power_of_two(up_low)
    if stochastic:
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int32).view(x.shape)
        whole = torch.floor(scaled)
        # floor(frac + u) + floor(x): exact for every word length, unlike floor(x + u).
        rounded = whole + torch.floor((scaled - whole) + dither(index + offset, seed))
    else:
        rounded = torch.round(scaled)
    limit = 2.0 ** (bits - 1) - 1.0
    return rounded.clamp(-limit, limit), up_low, up_high, exponent, finite


def round_blocks(
    x: Tensor, seed: int, offset: int, bits: int, stochastic: bool, codes: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Round every block (row) of float32 ``x [blocks, size]`` onto its BFP grid.

    Args:
        x: the values, one block per row.
        seed: the stream of the stochastic dither.
        offset: index of ``x``'s first element in its tensor (the dither's counter).
        bits: word length, 2..16.
        stochastic: stochastic rounding (else to nearest, ties to even).
        codes: return the integer codes (int8, or int16 above 8 bits) instead of values.

    Returns:
        ``(rounded, exponents, finite)``: the grid values (float32) or codes shaped like
        ``x``; the int32 exponent of each block; a 0-d bool tensor, False when ``x``
        held a NaN or an Inf (then the result is meaningless).
    """
    rounded, up_low, up_high, exponent, finite = _round_scaled(x, seed, offset, bits, stochastic)
    if codes:
        return rounded.to(torch.int8 if bits <= 8 else torch.int16), exponent.view(-1), finite
    values = rounded * power_of_two(-up_low) * power_of_two(-up_high)
    return values, exponent.view(-1), finite


def round_tensor(
    x: Tensor, seed: int, bits: int, stochastic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 ``x`` of any shape rounded as one block: ``(values, codes, exponent)``.

    The same numbers as :func:`round_blocks` on ``x`` flattened in its logical
    (row-major) order, offset 0: ``values`` in ``x``'s shape, their int8 codes (bits
    <= 8) beside them, and the block's int32 exponent ``[1]`` (``128 + bits - 2`` when
    ``x`` holds a NaN or an Inf: the codes' scale is then infinite). The integer engine's
    activation and error rounding: the values feed float operations, the codes
    integer products and what is saved for backward.
    """
    flat = x.contiguous().view(1, -1)
    rounded, up_low, up_high, exponent, finite = _round_scaled(flat, seed, 0, bits, stochastic)
    values = rounded * power_of_two(-up_low) * power_of_two(-up_high)
    # Codes cannot hold a NaN: a non-finite tensor gets the exponent whose scale
    # 2**(e - (bits-2)) is infinite, so whatever is computed from its codes is not
    # finite either, and the loss shows it (nothing reads a flag back on the hot path).
    exponent = torch.where(finite, exponent, EXPONENT_MAX + 1 + (bits - 2))
    return values.view(x.shape), rounded.to(torch.int8).view(x.shape), exponent.view(-1)


def relu_round_tensor(
    x: Tensor, seed: int, bits: int, stochastic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`round_tensor` of ``relu(x)``, the ReLU fused into the rounding's passes.

    (A ReLU's mask ``x > 0`` is better made outside: stored from a compiled CPU kernel,
    a bool tensor costs ten times an eager comparison.)
    """
    return round_tensor(torch.relu(x), seed, bits, stochastic)


def relu_avg_pool(
    x: Tensor, seed: int, bits: int, stochastic: bool, window_h: int, window_w: int
) -> tuple[Tensor, Tensor]:
    """A ReLU rounded as :func:`round_tensor` rounds it, then averaged over
    non-overlapping ``window_h x window_w`` windows: ``(pooled, mask)``.

    ``x`` is ``[N, C, H, W]`` with H and W multiples of the window. The rounded ReLU is
    never stored: the window sums of its grid values are exact in any order, so
    ``pooled`` equals ``avg_pool2d`` of it bit for bit. ``mask`` is ``x > 0`` as int8
    (0 or 1), what the ReLU's backward needs (int8: a bool store is slow in the code
    Inductor generates for the CPU).
    """
    n, c, h, w = x.shape
    flat = torch.relu(x).reshape(1, -1)
    rounded, up_low, up_high, _, _ = _round_scaled(flat, seed, 0, bits, stochastic)
    values = rounded * power_of_two(-up_low) * power_of_two(-up_high)
    windows = values.view(n, c, h // window_h, window_h, w // window_w, window_w)
    pooled = windows.sum(dim=(3, 5)) * (1.0 / (window_h * window_w))
    mask = torch.where(x > 0, 1.0, 0.0).to(torch.int8)
    return pooled, mask


def round_values(
    x: Tensor, seed: int, bits: int, stochastic: bool, checked: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`round_blocks`' values alone (offset 0), with its finiteness flag if ``checked``.

    What :func:`fedlpt.quant.quantize` needs: every output a compiled call returns is
    allocated and wrapped per call, a few microseconds each, a tenth of a small tensor's
    call.
    """
    values, _, finite = round_blocks(x, seed, 0, bits, stochastic, False)
    return values, (finite if checked else None)


def round_block_list(
    blocks: Sequence[Tensor],
    seeds: Sequence[int],
    offsets: Sequence[int],
    bits: int,
    stochastic: bool,
) -> tuple[list[Tensor], Tensor]:
    """:func:`round_blocks` (values) over several block views, each with its own seed and
    offset, in one call: one compiled graph, however many tensors.

    Returns the rounded views and one flag, False if any input held a NaN or an Inf.
    """
    outputs, flags = [], []
    for view, seed, offset in zip(blocks, seeds, offsets, strict=True):
        rounded, _, finite = round_blocks(view, seed, offset, bits, stochastic, False)
        outputs.append(rounded)
        flags.append(finite)
    return outputs, torch.stack(flags).all()


def round_block_list_(
    blocks: Sequence[Tensor],
    seeds: Sequence[int],
    offsets: Sequence[int],
    bits: int,
    stochastic: bool,
) -> list[Tensor]:
    """:func:`round_block_list` written into the block views themselves, unchecked.

    Compiled, the rounding stores straight into the inputs' memory: no output is
    allocated and nothing is copied back. Returns each view's block exponents. There is
    no finiteness flag: with one among the outputs, torch 2.14's C++ code generation
    fails on the in-place rows (a KeyError in its outer-loop fusion), so callers that
    must check go through :func:`round_block_list`.
    """
    exponents = []
    for view, seed, offset in zip(blocks, seeds, offsets, strict=True):
        rounded, exponent, _ = round_blocks(view, seed, offset, bits, stochastic, False)
        view.copy_(rounded)
        exponents.append(exponent)
    return exponents


class _Kernel:
    """A rounding function run through ``torch.compile`` when possible, else as it is.

    The word length and the rounding mode are compiled in (one variant per combination,
    made on first use); shapes, seeds and offsets become dynamic after the first change,
    so new shapes and seeds do not recompile again. So is torch's intra-op thread count:
    Inductor writes it into the C++ it generates (a kernel compiled at 1 thread has no
    OpenMP loop at all), and nothing would recompile it when the count changes.
    """

    def __init__(self, function: Callable[..., Any], *, static_shapes: bool = False) -> None:
        self.function = function
        # Compiled for each shape anew (a model has a few), seeds still symbolic: a
        # kernel whose windows are indexed by symbolic sizes is not vectorized
        # (measured 10x slower).
        self.static_shapes = static_shapes
        self.variants: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self.broken = os.environ.get("FEDLPT_EAGER", "") not in ("", "0")

    def __call__(self, *args: Any, static: tuple[Any, ...]) -> Any:
        if not self.broken:
            try:
                key = (*static, torch.get_num_threads())
                variant = self.variants.get(key)
                if variant is None:
                    _allow_recompiles()
                    # Automatic dynamism: the first call compiles for its shapes and seed,
                    # the next one that differs recompiles them as symbols, once. The
                    # constants compiled in stay constants (dynamic=True would turn them
                    # into symbols too, which some torch versions cannot shift).
                    fixed = _with_static(self.function, static, threads=key[-1])
                    variant = torch.compile(fixed, fullgraph=True)
                    self.variants[key] = variant
                if self.static_shapes:
                    for arg in args:
                        if isinstance(arg, Tensor):
                            torch._dynamo.mark_static(arg)
                return variant(*args)
            except Exception as err:  # no compiler, an unsupported device or backend
                self.broken = True
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                _LOG.warning(
                    "fedlpt: torch.compile is unavailable for %s (%s: %s); rounding runs eagerly",
                    self.function.__name__,
                    type(err).__name__,
                    reason,
                )
        return self.function(*args, *static)


def _allow_recompiles() -> None:
    """Give the variants room: they share one code object, whose compiled versions Dynamo
    caps (8 by default, then silently runs eagerly)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < _RECOMPILE_LIMIT:
            setattr(config, name, _RECOMPILE_LIMIT)


def _with_static(
    function: Callable[..., Any], static: tuple[Any, ...], threads: int
) -> Callable[..., Any]:
    """``function`` with its trailing arguments fixed as constants of the compiled code.

    Each variant (constants and thread count) gets a code object of its own: Dynamo keeps
    its compiled versions per code object, and would otherwise see the constants change
    between variants and turn them into symbols, or reuse a kernel compiled for another
    thread count.
    """

    def fixed(*args: Any) -> Any:
        return function(*args, *static)

    name = f"{function.__name__}_{'_'.join(map(str, static))}_t{threads}"
    code = fixed.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fixed.__globals__, name, None, fixed.__closure__)


round_blocks_kernel = _Kernel(round_blocks)
round_values_kernel = _Kernel(round_values)
round_block_list_kernel = _Kernel(round_block_list)
round_block_list_inplace_kernel = _Kernel(round_block_list_)
round_tensor_kernel = _Kernel(round_tensor)
relu_round_tensor_kernel = _Kernel(relu_round_tensor)
relu_avg_pool_kernel = _Kernel(relu_avg_pool, static_shapes=True)
_KERNELS = (
    round_blocks_kernel,
    round_values_kernel,
    round_block_list_kernel,
    round_block_list_inplace_kernel,
    round_tensor_kernel,
    relu_round_tensor_kernel,
    relu_avg_pool_kernel,
)


def compiled() -> bool:
    """Whether the rounding kernels run compiled (False once they fell back to eager)."""
    return not any(kernel.broken for kernel in _KERNELS)


def set_compiled(enabled: bool) -> None:
    """Run the rounding kernels compiled (the default) or eagerly, in this process.

    Eager and compiled results are identical bit for bit; eager skips the compile time
    of each new word length, which is what a test suite full of them wants.
    """
    for kernel in _KERNELS:
        kernel.broken = not enabled
