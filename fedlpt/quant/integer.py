"""The integer engine: low-precision training that multiplies 8-bit codes and keeps them.

The emulated engine (:func:`fedlpt.quant.training.prepare` with ``engine="emulated"``)
rounds every activation and error onto its BFP grid and then multiplies float32 copies,
so it costs more than FP32 in time and memory. This engine computes the same numbers
from the codes themselves:

* **Products in integers.** A tensor on a per-tensor grid is ``codes * 2**(e - (b-2))``;
  a weight with row blocks is ``codes[o] * 2**(e_o - (b-2))``. A convolution or linear
  layer whose input and weights lie on their grids is one int8 product with int32 sums
  (:func:`fedlpt.quant.gemm.matmul_codes`) scaled by powers of two: exact, where float32
  sums are exact only below ``2**24``. Backward, ``grad_w = e^T x`` is the same kind of
  product; ``grad_x = e W`` reduces across the weights' row exponents, so each row's
  codes are first aligned to the smallest exponent (an exact shift; the product then
  splits the wider codes into 8-bit digits, see :mod:`~fedlpt.quant.gemm`). A product
  with an operand off its grid (the model's input, which fedlpt never rounds; weights
  changed behind the optimizer wrapper's back) runs in float32, as emulated.
* **Activations kept in 8 bits.** What a module saves for backward is the int8 codes
  of its input wherever that input lies on a grid (convolution, linear and group norm
  inputs), a ReLU its mask, an average pooling nothing: restored exactly in backward.
* **The same draws.** Each module draws its rounding seeds at the points the emulated
  engine's hooks do, from the same generator, and rounds with the same kernel
  (:func:`fedlpt.quant.kernels.round_tensor`), so the two engines give the same
  results bit for bit wherever float32 sums are exact (the tests hold them to it).

Modules with an integer implementation: ``Conv1d``/``Conv2d`` (one group, zero
padding), ``Linear``, ``GroupNorm``, ``ReLU``, ``AvgPool2d``. Every other module that
the emulated engine quantizes keeps its torch forward followed by the same rounding,
whose codes a following integer layer still reads. :func:`prepare_integer` installs
them (through each module's ``forward``: parameters, buffers, hooks and ``state_dict``
stay those of the plain model); :func:`unprepare_integer` removes them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import gemm
from .bfp import BFP, draw_seed, stream_seed
from .kernels import (
    EXPONENT_MAX,
    power_of_two,
    relu_avg_pool_kernel,
    relu_round_tensor_kernel,
    round_blocks_kernel,
    round_tensor_kernel,
)

MAX_BITS = 8  # int8 codes
_GRID = "_fedlpt_grid"  # attribute of a value tensor holding its GridCodes
_POOLED_BY = "_fedlpt_pooled_by"  # attribute of a fused ReLU's output: the pooling it did
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridCodes:
    """A tensor on a per-tensor BFP grid, as int8 codes: ``codes * 2**(exponent - (bits-2))``.

    Attributes:
        codes: int8, the tensor's shape.
        exponent: int32 ``[1]``, the shared exponent (on the codes' device).
        bits: word length, 2..8.
        nonneg: every code is known to be >= 0 (a ReLU's output and what pools it).
    """

    codes: Tensor
    exponent: Tensor
    bits: int
    nonneg: bool = False

    @property
    def scale(self) -> Tensor:
        """``2**(exponent - (bits-2))`` as a float32 ``[1]`` tensor (exact)."""
        return power_of_two(self.exponent - (self.bits - 2))

    def values(self) -> Tensor:
        """The float32 values (exactly those the codes stand for)."""
        return self.codes.to(torch.float32).mul_(self.scale)


def attach(values: Tensor, grid: GridCodes) -> Tensor:
    """Record on ``values`` that it is ``grid`` (valid until ``values`` is modified)."""
    setattr(values, _GRID, (grid, values._version))
    return values


def grid_of(x: Tensor) -> GridCodes | None:
    """The codes attached to ``x`` (or to the tensor it views, reshaped), else None.

    None when ``x`` has none or was modified in place since (its version moved).
    """
    found = getattr(x, _GRID, None)
    if found is not None:
        grid, version = found
        if x._version == version:
            return grid
        return None
    base = x._base
    if base is None:
        return None
    found = getattr(base, _GRID, None)
    if found is None or base._version != found[1]:
        return None
    grid = found[0]
    # A reshaping view (Flatten, view, reshape) that covers the whole base in its order.
    if (
        x.numel() == base.numel()
        and x.data_ptr() == base.data_ptr()
        and x.is_contiguous()
        and base.is_contiguous()
        and grid.codes.is_contiguous()
    ):
        return GridCodes(grid.codes.view(x.shape), grid.exponent, grid.bits, grid.nonneg)
    return None


@dataclass
class WeightCodes:
    """A weight on its grid as int8 codes, one exponent per row (or one for the tensor)."""

    codes: Tensor  # int8, the weight's shape
    exponents: Tensor  # int32 [rows]; rows = out channels ("row") or 1 ("tensor")
    bits: int
    _aligned: tuple[Tensor, int] | None = field(default=None, repr=False)

    def scale(self) -> Tensor:
        """Each row's ``2**(e - (bits-2))``, float32 ``[rows]``."""
        return power_of_two(self.exponents - (self.bits - 2))

    def aligned(self) -> tuple[Tensor, int]:
        """``(codes << (e_row - e_min), e_min)``: every row on the smallest row exponent.

        The integer codes, as int32, of the same values on one grid whose exponent is
        ``e_min``: exact, for products that sum across rows (the input gradient). A
        row ``s`` exponents above the smallest needs ``s`` more bits.
        """
        if self._aligned is None:
            bottom = self.exponents.min()
            shift = (self.exponents - bottom).view(-1, *([1] * (self.codes.dim() - 1)))
            wide = self.codes.to(torch.int32) << shift
            self._aligned = (wide, int(bottom))
        return self._aligned


_ON_GRID = "_fedlpt_on_grid"  # a parameter's (bits, block, version, address) when rounded


def mark_on_grid(tensors: list[Tensor], fmt: BFP) -> None:
    """Record that ``tensors`` were just rounded onto ``fmt``'s grid (by the optimizer
    wrapper), so :func:`weight_codes` reads their codes without checking them. Any later
    in-place change moves the tensor's version and voids the mark, and so does new memory
    (``param.data = ...``); writing through ``param.data`` in place moves neither, as
    torch's own version checks do not see it."""
    for tensor in tensors:
        setattr(tensor, _ON_GRID, (fmt.bits, fmt.block, tensor._version, tensor.data_ptr()))


def weight_codes(weight: Tensor, fmt: BFP) -> WeightCodes | None:
    """``weight``'s codes in ``fmt`` (tensor or row blocks), or None if it is off that grid.

    A weight the optimizer wrapper marked (:func:`mark_on_grid`) since its last change
    is read without a check; any other is checked (one read back to the host).
    """
    rows = weight.shape[0] if fmt.block == "row" and weight.dim() >= 2 else 1
    flat = weight.detach().to(torch.float32).reshape(rows, -1)
    # Rounding grid values to nearest only reads their codes off.
    codes, exponents, finite = round_blocks_kernel(flat, 0, 0, static=(fmt.bits, False, True))
    # A NaN or an Inf gets the exponent of an infinite scale: it shows in the loss.
    exponents = torch.where(finite, exponents, EXPONENT_MAX + 1 + (fmt.bits - 2))
    found = WeightCodes(codes.view(weight.shape), exponents.view(-1), fmt.bits)
    mark = getattr(weight, _ON_GRID, None)
    if mark == (fmt.bits, fmt.block, weight._version, weight.data_ptr()):
        return found
    decoded = codes.to(torch.float32) * found.scale().view(-1, 1)
    if not bool(finite) or not torch.equal(decoded, flat):
        return None
    return found


@dataclass
class Layer:
    """What an integer module needs beyond its parameters: formats, stream, product backend."""

    name: str
    activation: BFP
    error: BFP | None
    weight: BFP | None
    generator: torch.Generator | None
    error_on_grid: bool = False
    backend: str | None = None  # a gemm backend by name; None: gemm's choice
    _weight_key: tuple[Any, ...] | None = field(default=None, repr=False)
    _weight_codes: WeightCodes | None = field(default=None, repr=False)
    _warned: bool = field(default=False, repr=False)

    def int8(
        self, like: Tensor, macs: int, *, direct: bool = False, signed: bool = False
    ) -> str | None:
        """The backend for a product of ``macs`` multiply-adds, or None: torch's float32
        op (as emulated) is as fast there (:func:`fedlpt.quant.gemm.product_backend`).
        A layer given a backend by name runs every product through it."""
        if self.backend is not None:
            return self.backend
        return gemm.product_backend(like.device, macs, direct=direct, signed=signed)

    def codes_of_weight(self, weight: Tensor) -> WeightCodes | None:
        """The weight's codes, re-read whenever the weight changed (its version moved)."""
        if self.weight is None:
            return None
        key = (weight._version, weight.data_ptr(), tuple(weight.shape), weight.device)
        if key != self._weight_key:
            self._weight_codes = weight_codes(weight, self.weight)
            self._weight_key = key
            if self._weight_codes is None and not self._warned:
                self._warned = True
                _LOG.warning(
                    "fedlpt integer engine: %s's weight is off its %d-bit %s grid (changed "
                    "outside the optimizer wrapper?): its products run in float32",
                    self.name,
                    self.weight.bits,
                    self.weight.block,
                )
        return self._weight_codes

    def next_seed(self) -> int:
        """The seed of this module's next rounding, drawn as the emulated engine's
        :func:`~fedlpt.quant.bfp.quantize` draws it."""
        return stream_seed(draw_seed(self.generator), 0)

    def round_output(self, y: Tensor, nonneg: bool = False) -> Tensor:
        """``y`` rounded to the activation format (one seed drawn), codes attached."""
        seed = self.next_seed()
        static = (self.activation.bits, self.activation.rounding == "stochastic")
        # A channels-last product is made contiguous eagerly: reading it transposed in
        # the rounding kernel (whose dither counts in logical order) is slower.
        values, codes, exponent = round_tensor_kernel(
            y.to(torch.float32).contiguous(), seed, static=static
        )
        return attach(values, GridCodes(codes, exponent, self.activation.bits, nonneg))

    def round_error(self, grad: Tensor, want_codes: bool) -> tuple[Tensor, GridCodes | None]:
        """The arriving error rounded to the error format, as the emulated quantizer's
        backward does (a seed drawn even where the rounding is proved the identity)."""
        fmt = self.error
        if fmt is None:
            return grad, None
        if self.error_on_grid:
            draw_seed(self.generator)
            if not want_codes:
                return grad, None
            # Already on the grid: rounding to nearest only reads its codes off.
            values, codes, exponent = round_tensor_kernel(grad, 0, static=(fmt.bits, False))
            return grad, GridCodes(codes, exponent, fmt.bits)
        seed = stream_seed(draw_seed(self.generator), 0)
        static = (fmt.bits, fmt.rounding == "stochastic")
        values, codes, exponent = round_tensor_kernel(
            grad.to(torch.float32).contiguous(), seed, static=static
        )
        return values, GridCodes(codes, exponent, fmt.bits)


# --- convolution and linear products on codes -----------------------------------------


def _pair(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _pad_spatial(codes: Tensor, padding: tuple[int, int], channels_last: bool) -> Tensor:
    """``codes [N, C, H, W]`` zero-padded in H and W, as ``[N, H', W', C]`` (channels
    last) or ``[N, C, H', W']``, contiguous; negative padding crops."""
    top, left = padding
    if top < 0 or left < 0:
        crop_h, crop_w = max(0, -top), max(0, -left)
        codes = codes[:, :, crop_h : codes.shape[2] - crop_h, crop_w : codes.shape[3] - crop_w]
        top, left = max(0, top), max(0, left)
    n, c, h, w = codes.shape
    source = codes.permute(0, 2, 3, 1) if channels_last else codes
    if not top and not left:
        return source.contiguous()
    if channels_last:
        padded = codes.new_zeros(n, h + 2 * top, w + 2 * left, c)
        padded[:, top : top + h, left : left + w] = source
    else:
        padded = codes.new_zeros(n, c, h + 2 * top, w + 2 * left)
        padded[:, :, top : top + h, left : left + w] = source
    return padded


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col_rows(
    codes: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``[N*Ho*Wo, kh*kw*C]``: one row per output position, its window channels last.

    Built in int8 (a quarter of float32's bytes) from a channels-last copy, whose
    windows are contiguous runs of channels.
    """
    n, _, h, w = codes.shape
    padded = _pad_spatial(codes, padding, channels_last=True)
    eff_h, eff_w = max(padding[0], 0), max(padding[1], 0)
    crop_h, crop_w = max(0, -padding[0]), max(0, -padding[1])
    ho = _out_size(h - 2 * crop_h, kernel[0], stride[0], eff_h, dilation[0])
    wo = _out_size(w - 2 * crop_w, kernel[1], stride[1], eff_w, dilation[1])
    s_n, s_h, s_w, s_c = padded.stride()
    windows = padded.as_strided(
        (n, ho, wo, kernel[0], kernel[1], padded.shape[3]),
        (s_n, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1], s_c),
    )
    return windows.reshape(n * ho * wo, -1)


def im2col_columns(
    codes: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``[C*kh*kw, N*Ho*Wo]``: :func:`im2col_rows` transposed, in the weight's
    ``(c, kh, kw)`` order (from a channels-first copy, whose rows are contiguous)."""
    n, c, h, w = codes.shape
    padded = _pad_spatial(codes, padding, channels_last=False)
    ho = _out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    s_n, s_c, s_h, s_w = padded.stride()
    windows = padded.as_strided(
        (c, kernel[0], kernel[1], n, ho, wo),
        (s_c, s_h * dilation[0], s_w * dilation[1], s_n, s_h * stride[0], s_w * stride[1]),
    )
    return windows.reshape(c * kernel[0] * kernel[1], n * ho * wo)


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's static shape parameters (a Conv1d is one of height 1)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, module: nn.Conv1d | nn.Conv2d) -> ConvGeometry:
        dims = 1 if isinstance(module, nn.Conv1d) else 2

        def lift(value: Any, fill: int) -> tuple[int, int]:
            values = _pair(value, dims)
            return (fill, values[0]) if dims == 1 else (values[0], values[1])

        return cls(
            lift(module.kernel_size, 1),
            lift(module.stride, 1),
            lift(module.padding, 0),
            lift(module.dilation, 1),
        )

    def macs(self, input_shape: torch.Size, weight_shape: torch.Size) -> int:
        """Multiply-adds of the convolution of ``input_shape`` with ``weight_shape``."""
        n, _, h, w = input_shape
        out_h, out_w = (
            _out_size(size, k, s, p, d)
            for size, k, s, p, d in zip(
                (h, w), self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )
        return n * out_h * out_w * prod(weight_shape)


def conv2d_codes(
    x: GridCodes,
    w: WeightCodes,
    bias: Tensor | None,
    geometry: ConvGeometry,
    backend: str | None = None,
) -> Tensor:
    """``conv2d(x, w) + bias`` from codes: float32 ``[N, O, Ho, Wo]``, sums exact.

    A direct int8 convolution where the backend has one
    (:func:`fedlpt.quant.gemm.conv2d_codes`), else an int8 product of im2col rows.
    """
    out_channels = w.codes.shape[0]
    scale = (x.scale * w.scale()).expand(out_channels)
    direct = gemm.conv2d_codes(
        x.codes,
        w.codes,
        scale=scale,
        bias=bias,
        stride=geometry.stride,
        padding=geometry.padding,
        dilation=geometry.dilation,
        x_nonneg=x.nonneg,
        backend_name=backend,
    )
    if direct is not None:
        return direct
    n, _, h, width = x.codes.shape
    rows = im2col_rows(
        x.codes, geometry.kernel, geometry.stride, geometry.padding, geometry.dilation
    )
    matrix = w.codes.permute(0, 2, 3, 1).reshape(out_channels, -1)
    out = gemm.matmul_codes(
        rows, matrix, scale=scale, bias=bias, a_nonneg=x.nonneg, backend_name=backend
    )
    ho, wo = (
        _out_size(size, k, s, p, d)
        for size, k, s, p, d in zip(
            (h, width),
            geometry.kernel,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            strict=True,
        )
    )
    return out.view(n, ho, wo, out_channels).permute(0, 3, 1, 2)


def conv2d_weight_grad_codes(
    x: GridCodes,
    e: GridCodes,
    weight_shape: torch.Size,
    geometry: ConvGeometry,
    backend: str | None = None,
) -> Tensor:
    """``grad_w = e (*) x`` from codes: float32 in the weight's shape, sums exact."""
    columns = im2col_columns(
        x.codes, geometry.kernel, geometry.stride, geometry.padding, geometry.dilation
    )
    out_channels = e.codes.shape[1]
    errors = e.codes.permute(1, 0, 2, 3).reshape(out_channels, -1)
    scale = (x.scale * e.scale).expand(out_channels)
    grad = gemm.matmul_codes(columns, errors, scale=scale, a_nonneg=x.nonneg, backend_name=backend)
    return grad.t().reshape(weight_shape)


def conv2d_input_grad_codes(
    e: GridCodes,
    w: WeightCodes,
    input_shape: torch.Size,
    geometry: ConvGeometry,
    backend: str | None = None,
) -> Tensor | None:
    """``grad_x`` (a stride-1 transposed convolution of ``e`` with ``w``) from codes, or
    None where it does not apply (strides above 1: float32 then).

    The reduction runs over output channels, across the weights' row exponents: each
    row's codes are shifted onto the smallest row exponent first (exact).
    """
    if geometry.stride != (1, 1):
        return None
    aligned, bottom = w.aligned()
    kh, kw = geometry.kernel
    # The correlation of e (padded by d*(k-1) - p) with the flipped, transposed kernel.
    padding = tuple(
        d * (k - 1) - p
        for k, p, d in zip(geometry.kernel, geometry.padding, geometry.dilation, strict=True)
    )
    rows = im2col_rows(e.codes, geometry.kernel, (1, 1), padding, geometry.dilation)  # type: ignore[arg-type]
    in_channels = aligned.shape[1]
    matrix = aligned.flip(2, 3).permute(1, 2, 3, 0).reshape(in_channels, kh * kw * aligned.shape[0])
    scale = e.scale * power_of_two(
        torch.tensor([bottom - (w.bits - 2)], dtype=torch.int32, device=e.codes.device)
    )
    out = gemm.matmul_codes(rows, matrix, scale=scale.expand(in_channels), backend_name=backend)
    n, _, h, width = input_shape
    return out.view(n, h, width, in_channels).permute(0, 3, 1, 2)


# --- autograd functions ------------------------------------------------------------------


def _keep_input(ctx: Any, x: Tensor, *others: Tensor | None) -> None:
    """Save ``x`` for backward as its codes where it has them, else as it is, with
    ``others``; :func:`_kept_input` reads them back. Everything goes through
    ``save_for_backward``, so autograd's saved-tensor hooks see (and can measure or
    offload) exactly what is kept."""
    grid = grid_of(x)
    if grid is None:
        ctx.input_grid = None
        ctx.save_for_backward(x, *others)
    else:
        ctx.input_grid = (grid.bits, grid.nonneg)
        ctx.save_for_backward(grid.codes, grid.exponent, *others)


def _kept_input(ctx: Any) -> tuple[GridCodes | None, Tensor | None, tuple[Any, ...]]:
    """``(codes or None, tensor or None, others)`` as :func:`_keep_input` saved them."""
    saved = ctx.saved_tensors
    if ctx.input_grid is None:
        return None, saved[0], saved[1:]
    bits, nonneg = ctx.input_grid
    return GridCodes(saved[0], saved[1], bits, nonneg), None, saved[2:]


def _restore(grid: GridCodes | None, tensor: Tensor | None) -> Tensor:
    return grid.values() if grid is not None else tensor  # type: ignore[return-value]


def _conv_weight_codes(layer: Layer, weight: Tensor, dims: int) -> WeightCodes | None:
    """The weight's codes as a 2-D convolution's (a Conv1d's get a height of 1)."""
    codes = layer.codes_of_weight(weight)
    if codes is not None and dims == 1:
        codes = WeightCodes(codes.codes.unsqueeze(2), codes.exponents, codes.bits)
    return codes


class _IntegerConv(torch.autograd.Function):
    """Conv (one group) + bias + activation rounding; backward: error rounding + products."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        layer: Layer,
        geometry: ConvGeometry,
        dims: int,
    ) -> Tensor:
        # A Conv1d runs as a Conv2d of height 1.
        x2 = x if dims == 2 else x.unsqueeze(2)
        grid = grid_of(x2)
        weight2 = weight if dims == 2 else weight.unsqueeze(2)
        y = None
        name = None
        if grid is not None:
            name = layer.int8(x, geometry.macs(x2.shape, weight2.shape), direct=grid.nonneg)
        # The weight's codes are read only for a product that uses them.
        codes = _conv_weight_codes(layer, weight, dims) if name is not None else None
        if grid is not None and codes is not None:
            y = conv2d_codes(grid, codes, bias, geometry, name)
        if y is None:
            y = F.conv2d(x2, weight2, bias, geometry.stride, geometry.padding, geometry.dilation)
        out = layer.round_output(y)
        ctx.layer, ctx.geometry, ctx.dims = layer, geometry, dims
        ctx.input_shape, ctx.has_bias, ctx.weight_codes = x2.shape, bias is not None, codes
        _keep_input(ctx, x2, weight)
        return out if dims == 2 else out.squeeze(2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        layer: Layer = ctx.layer
        geometry: ConvGeometry = ctx.geometry
        x_grid, saved_x, (weight,) = _kept_input(ctx)
        grad2 = grad if ctx.dims == 2 else grad.unsqueeze(2)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        error, e_grid = layer.round_error(grad2, want_codes=True)
        weight2 = weight if ctx.dims == 2 else weight.unsqueeze(2)
        macs = geometry.macs(ctx.input_shape, weight2.shape)
        grad_x = grad_w = grad_b = None
        if need_b and ctx.has_bias:
            grad_b = error.sum(dim=(0, 2, 3))
        codes: WeightCodes | None = ctx.weight_codes
        if need_w and e_grid is not None and x_grid is not None:
            name = layer.int8(grad, macs)
            if name is not None:
                grad_w = conv2d_weight_grad_codes(x_grid, e_grid, weight2.shape, geometry, name)
        if need_x and e_grid is not None and geometry.stride == (1, 1):
            name = layer.int8(grad, macs, signed=True)
            if name is not None and codes is None:
                codes = _conv_weight_codes(layer, weight, ctx.dims)
            if name is not None and codes is not None:
                grad_x = conv2d_input_grad_codes(e_grid, codes, ctx.input_shape, geometry, name)
        # What is left runs as the emulated engine runs it: torch's float32 backward.
        missing = [need_x and grad_x is None, need_w and grad_w is None, False]
        if any(missing):
            x_values = _restore(x_grid, saved_x) if missing[1] else error.new_empty(ctx.input_shape)
            fallback = torch.ops.aten.convolution_backward(
                error,
                x_values,
                weight2,
                None,
                list(geometry.stride),
                list(geometry.padding),
                list(geometry.dilation),
                False,
                [0, 0],
                1,
                missing,
            )
            grad_x = fallback[0] if missing[0] else grad_x
            grad_w = fallback[1] if missing[1] else grad_w
        if ctx.dims == 1:
            grad_x = grad_x.squeeze(2) if grad_x is not None else None
            grad_w = grad_w.squeeze(2) if grad_w is not None else None
        return grad_x, grad_w, grad_b, None, None, None


class _IntegerLinear(torch.autograd.Function):
    """Linear + bias + activation rounding; backward: error rounding + products."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: Layer) -> Tensor:  # type: ignore[override]
        grid = grid_of(x)
        features = weight.shape[1]
        macs = x.numel() * weight.shape[0]
        name = layer.int8(x, macs) if grid is not None else None
        codes = layer.codes_of_weight(weight) if name is not None else None
        if grid is not None and codes is not None:
            y = gemm.matmul_codes(
                grid.codes.reshape(-1, features),
                codes.codes,
                scale=(grid.scale * codes.scale()).expand(weight.shape[0]),
                bias=bias,
                a_nonneg=grid.nonneg,
                backend_name=name,
            ).view(*x.shape[:-1], weight.shape[0])
        else:
            y = F.linear(x, weight, bias)
        out = layer.round_output(y)
        ctx.layer, ctx.input_shape, ctx.has_bias = layer, x.shape, bias is not None
        ctx.weight_codes = codes
        _keep_input(ctx, x, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        layer: Layer = ctx.layer
        x_grid, saved_x, (weight,) = _kept_input(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        error, e_grid = layer.round_error(grad, want_codes=True)
        out_features, in_features = weight.shape
        error2 = error.reshape(-1, out_features)
        grad_x = grad_w = grad_b = None
        if need_b and ctx.has_bias:
            grad_b = error2.sum(0)
        macs = error2.shape[0] * out_features * in_features
        name = layer.int8(grad, macs) if e_grid is not None and x_grid is not None else None
        if need_w and name is not None:
            assert e_grid is not None and x_grid is not None
            grad_w = (
                gemm.matmul_codes(
                    x_grid.codes.reshape(-1, in_features).t().contiguous(),
                    e_grid.codes.reshape(-1, out_features).t().contiguous(),
                    scale=(x_grid.scale * e_grid.scale).expand(out_features),
                    a_nonneg=x_grid.nonneg,
                    backend_name=name,
                )
                .t()
                .contiguous()
            )
        elif need_w:
            grad_w = error2.t() @ _restore(x_grid, saved_x).reshape(-1, in_features)
        codes: WeightCodes | None = ctx.weight_codes
        name = layer.int8(grad, macs, signed=True) if need_x and e_grid is not None else None
        if name is not None and codes is None:
            codes = layer.codes_of_weight(weight)
        if need_x and e_grid is not None and codes is not None and name is not None:
            aligned, bottom = codes.aligned()
            scale = e_grid.scale * power_of_two(
                torch.tensor([bottom - (codes.bits - 2)], dtype=torch.int32, device=grad.device)
            )
            grad_x = gemm.matmul_codes(
                e_grid.codes.reshape(-1, out_features),
                aligned.t().contiguous(),
                scale=scale.expand(in_features),
                backend_name=name,
            ).view(ctx.input_shape)
        if need_x and grad_x is None:
            grad_x = (error2 @ weight).view(ctx.input_shape)
        return grad_x, grad_w, grad_b, None


class _GridGroupNorm(torch.autograd.Function):
    """Group norm that keeps its input as codes when the input lies on a grid."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
    ) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        spatial = x.numel() // max(1, n * c)
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, spatial, groups, eps)
        ctx.sizes = (n, c, spatial, groups)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        _keep_input(ctx, x, mean, rstd, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_grid, saved_x, (mean, rstd, weight) = _kept_input(ctx)
        x = _restore(x_grid, saved_x)
        n, c, spatial, groups = ctx.sizes
        mask = [
            ctx.needs_input_grad[0],
            ctx.has_weight and ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x.contiguous(), mean, rstd, weight, n, c, spatial, groups, mask
        )
        return grad_x, grad_w, grad_b, None, None


class _IntegerReLU(torch.autograd.Function):
    """ReLU + activation rounding, keeping only its mask; backward: error rounding + mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: Layer) -> Tensor:  # type: ignore[override]
        seed = layer.next_seed()
        fmt = layer.activation
        values, codes, exponent = relu_round_tensor_kernel(
            x.to(torch.float32), seed, static=(fmt.bits, fmt.rounding == "stochastic")
        )
        mask = x > 0
        ctx.layer = layer
        ctx.save_for_backward(mask)
        return attach(values, GridCodes(codes, exponent, fmt.bits, nonneg=True))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        error, _ = ctx.layer.round_error(grad, want_codes=False)
        return torch.where(mask, error, 0.0), None


class _IntegerAvgPool2d(torch.autograd.Function):
    """Average pooling + activation rounding, keeping nothing but shapes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: Layer, args: tuple[Any, ...]) -> Tensor:  # type: ignore[override]
        y = F.avg_pool2d(x, *args)
        grid = grid_of(x)
        out = layer.round_output(y, nonneg=grid is not None and grid.nonneg)
        ctx.layer, ctx.args, ctx.input_shape, ctx.dtype = layer, args, x.shape, x.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        error, _ = ctx.layer.round_error(grad, want_codes=False)
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.args
        # The backward reads its input's shape only: an untouched allocation stands in.
        shape_only = error.new_empty(ctx.input_shape)
        grad_x = torch.ops.aten.avg_pool2d_backward(
            error, shape_only, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )
        return grad_x, None, None


def _spread(x: Tensor, window_h: int, window_w: int) -> Tensor:
    """Each value of ``x [N, C, H, W]`` repeated over a ``window_h x window_w`` window:
    ``[N, C, H*window_h, W*window_w]`` (along W first, then whole rows along H: both
    copies read contiguous runs, faster than ``repeat_interleave`` or one 6-D copy)."""
    n, c, h, w = x.shape
    along_w = torch.empty(n, c, h, w, window_w, dtype=x.dtype, device=x.device)
    along_w.copy_(x.unsqueeze(-1).expand(n, c, h, w, window_w))
    rows = along_w.view(n, c, h, 1, w * window_w).expand(n, c, h, window_h, w * window_w)
    out = torch.empty(n, c, h, window_h, w * window_w, dtype=x.dtype, device=x.device)
    out.copy_(rows)
    return out.view(n, c, h * window_h, w * window_w)


class _IntegerReLUAvgPool(torch.autograd.Function):
    """A ReLU and the exact average pooling that alone reads it, in one pass.

    Forward, the ReLU's rounded output is pooled inside the rounding kernel and never
    stored; the ReLU keeps its mask (int8), the pooling nothing. Backward, the pooled
    error is spread over each window (divided by the window's size, exact) and masked.
    The same draws as the two modules apart: the ReLU's seed, then the pooling's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, relu: Layer, pool: Layer, window: tuple[int, int]
    ) -> Tensor:
        fmt = relu.activation
        static = (fmt.bits, fmt.rounding == "stochastic", *window)
        pooled, mask = relu_avg_pool_kernel(x.to(torch.float32), relu.next_seed(), static=static)
        out = pool.round_output(pooled, nonneg=True)
        ctx.layers, ctx.window = (relu, pool), window
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        relu, pool = ctx.layers
        (mask,) = ctx.saved_tensors
        window_h, window_w = ctx.window
        error, _ = pool.round_error(grad, want_codes=False)
        spread = _spread(error * (1.0 / (window_h * window_w)), window_h, window_w)
        # Proved on its grid where prepare skips the ReLU's error rounding (a seed drawn).
        spread, _ = relu.round_error(spread, want_codes=False)
        return spread.mul_(mask.view(torch.bool)), None, None, None


class _RoundOutput(torch.autograd.Function):
    """The rounding after a module without an integer implementation, codes attached."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, layer: Layer) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.round_output(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        error, _ = ctx.layer.round_error(grad, want_codes=False)
        return error, None


# --- installing the engine on a model ----------------------------------------------------


def supports(module: nn.Module) -> bool:
    """Whether ``module`` has an integer implementation (else: torch forward + rounding)."""
    if type(module) in (nn.Conv1d, nn.Conv2d):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return type(module) in (nn.Linear, nn.GroupNorm, nn.ReLU, nn.AvgPool2d)


def _conv_forward(
    module: nn.Conv1d | nn.Conv2d, layer: Layer, geometry: ConvGeometry, dims: int, x: Tensor
) -> Tensor:
    return _IntegerConv.apply(x, module.weight, module.bias, layer, geometry, dims)


def _linear_forward(module: nn.Linear, layer: Layer, x: Tensor) -> Tensor:
    return _IntegerLinear.apply(x, module.weight, module.bias, layer)


def _group_norm_forward(module: nn.GroupNorm, x: Tensor) -> Tensor:
    return _GridGroupNorm.apply(x, module.weight, module.bias, module.num_groups, module.eps)


def _relu_forward(layer: Layer, x: Tensor) -> Tensor:
    return _IntegerReLU.apply(x, layer)


def _relu_pool_forward(
    layer: Layer, pool: Layer, pooling: nn.AvgPool2d, window: tuple[int, int], x: Tensor
) -> Tensor:
    """The ReLU's forward when an exact pooling follows: the pooled output, marked as
    such for the pooling's own forward to pass on (a shape it cannot pool: apart)."""
    if x.dim() != 4 or x.shape[2] % window[0] or x.shape[3] % window[1]:
        return _IntegerReLU.apply(x, layer)
    out = _IntegerReLUAvgPool.apply(x, layer, pool, window)
    setattr(out, _POOLED_BY, pooling)
    return out


def _avg_pool_forward(module: nn.AvgPool2d, layer: Layer, x: Tensor) -> Tensor:
    if getattr(x, _POOLED_BY, None) is module:
        return x  # the fused ReLU before it pooled already
    args = (
        _pair(module.kernel_size, 2),
        _pair(module.stride if module.stride is not None else module.kernel_size, 2),
        _pair(module.padding, 2),
        module.ceil_mode,
        module.count_include_pad,
        module.divisor_override,
    )
    return _IntegerAvgPool2d.apply(x, layer, args)


def _round_hook(layer: Layer) -> Callable[..., Tensor]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return _RoundOutput.apply(output, layer)

    return hook


def prepare_integer(
    model: nn.Module,
    *,
    quantized: tuple[type[nn.Module], ...],
    activation: BFP,
    error: BFP | None,
    weight: BFP | None,
    generator: torch.Generator | None,
    errors_on_grid: set[str],
    pools_after: dict[str, nn.Module] | None = None,
    backend: str | None = None,
) -> list[Any]:
    """Install the integer engine on every module of ``model``; returns what to undo.

    Modules of the ``quantized`` types round their output (and error), as emulated;
    those :func:`supports` names run their integer forward, the others their torch
    forward followed by the rounding (a forward hook). Group norms keep codes of their
    input. ``errors_on_grid`` names the modules whose error rounding is skipped.
    ``pools_after`` maps modules to the exact average pooling that alone reads their
    output (:func:`fedlpt.quant.training.pooled_pairs`): a ReLU there runs fused with
    it. ``backend`` names the int8 product backend of every layer (default: the one
    :func:`fedlpt.quant.gemm.choose` picks, small products in float32).
    """
    pools_after = pools_after or {}
    layers = {
        name: Layer(
            name=name,
            activation=activation,
            error=error,
            weight=weight,
            generator=generator,
            error_on_grid=name in errors_on_grid,
            backend=backend,
        )
        for name, module in model.named_modules()
    }
    names = {id(module): name for name, module in model.named_modules()}
    undo: list[Any] = []
    for name, module in model.named_modules():
        layer = layers[name]
        forward: Callable[..., Tensor] | None = None
        if type(module) is nn.GroupNorm:
            forward = functools.partial(_group_norm_forward, module)
        elif not isinstance(module, quantized):
            continue
        elif supports(module) and type(module) in (nn.Conv1d, nn.Conv2d):
            dims = 1 if type(module) is nn.Conv1d else 2
            geometry = ConvGeometry.of(module)  # type: ignore[arg-type]
            forward = functools.partial(_conv_forward, module, layer, geometry, dims)
        elif type(module) is nn.Linear:
            forward = functools.partial(_linear_forward, module, layer)
        elif type(module) is nn.ReLU and type(pools_after.get(name)) is nn.AvgPool2d:
            pooling = pools_after[name]
            window = _pair(pooling.kernel_size, 2)
            pool_layer = layers[names[id(pooling)]]
            forward = functools.partial(_relu_pool_forward, layer, pool_layer, pooling, window)
        elif type(module) is nn.ReLU:
            forward = functools.partial(_relu_forward, layer)
        elif type(module) is nn.AvgPool2d:
            forward = functools.partial(_avg_pool_forward, module, layer)
        if forward is not None:
            module.forward = forward  # type: ignore[method-assign]
            undo.append(("forward", module))
        else:
            undo.append(("hook", module.register_forward_hook(_round_hook(layer))))
    return undo


def unprepare_integer(undo: list[Any]) -> None:
    """Undo :func:`prepare_integer`."""
    for kind, item in undo:
        if kind == "forward":
            del item.forward
        else:
            item.remove()
