"""Exact products of BFP integer codes: ``A @ B.T`` with int8 operands, int32 sums.

The integer engine (:mod:`fedlpt.quant.integer`) multiplies the codes of tensors that
lie on a BFP grid; this module is the one place that knows how a platform multiplies
int8 matrices exactly. :func:`matmul_codes` takes ``a`` (int8 codes, ``[M, K]``) and
``b`` (small integers, ``[N, K]``: int8 codes, or codes aligned to a common exponent,
which can need more than 8 bits) and returns the float32 product
``(a @ b.T) * scale + bias``, with every sum of code products exact wherever the
partial sums stay below ``2**24`` in magnitude (``K * 127 * max|b| < 2**24``; the 8-bit
ConvNet's are orders of magnitude below), and then rounded to float32 once.

Backends (:data:`BACKENDS`):

* ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32). Fast on CUDA and on CPUs
  where oneDNN takes it (AVX512-VNNI, AMX); elsewhere (this project's AVX2 machine,
  torch's aarch64 build) it is a reference loop 20-30x slower than float32.
* ``"onednn"``: oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``,
  unsigned x signed 8-bit, scale and bias fused, float32 out), fast on every x86 CPU.
  Without VNNI the CPU adds pairs of u8 x s8 products in 16 bits, saturating
  (``vpmaddubsw``); the operands are kept where no pair can: ``a`` non-negative (codes
  0..127, ReLU outputs) against full int8 ``b``, or ``a`` shifted by 128 (u8 with zero
  point 128) against ``b`` split in base-64 digits. Each extra digit of ``b`` is one more
  column block of the same call.
* ``"float"``: float32 ``matmul`` of the codes: the emulated engine's arithmetic, exact
  while partial sums stay below ``2**24``; no speed-up, the memory saving stays.

:func:`backend` picks, once per process and device, the fastest backend that gives
exact results on a probe, if it beats float32 by :data:`MIN_SPEEDUP` (timed on a
representative product; the choice is logged once). ``FEDLPT_INT8_BACKEND`` forces one.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BACKENDS = ("int_mm", "onednn", "float")
# The probe's products: a small one that shows a reference loop (tens of times slower
# than float32) cheaply, then the 28x28 ConvNet's last convolution at batch 32 (im2col),
# big enough that a call's fixed cost does not decide.
SCREEN_SHAPE = (256, 576, 128)
PROBE_SHAPE = (2048, 1152, 128)
# An int8 backend is chosen only where it takes at most this share of float32's time.
MIN_SPEEDUP = 0.8
# Products with a signed left operand (input gradients) go through it only below this
# share: their float32 alternative is torch's own convolution backward, which beats the
# float32 product of im2col'd operands that the probe times.
SIGNED_SPEEDUP = 0.6
# Below these many multiply-adds a product runs in float32 (torch's own convolution or
# matmul, as the emulated engine), where an int8 call's fixed costs would eat its gain
# (measured on the AVX2 machine: oneDNN's direct convolution already wins at 2**24, the
# im2col products, which copy every window and prepack an operand, only near 2**28).
MIN_DIRECT_MACS = 1 << 24
MIN_INT8_MACS = 1 << 28
ENV_BACKEND = "FEDLPT_INT8_BACKEND"

_LOG = logging.getLogger(__name__)
_CHOICE: dict[str, Choice] = {}
_CHOICE_LOCK = threading.Lock()
# Whether oneDNN's u8 x s8 product adds pairs in saturating 16 bits on this CPU (no
# VNNI): found out once, by the product that saturates if it can.
_ONEDNN_SATURATES: list[bool] = []


def matmul_codes(
    a: Tensor,
    b: Tensor,
    *,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    a_nonneg: bool = False,
    backend_name: str | None = None,
) -> Tensor:
    """``(a @ b.T) * scale + bias`` in float32 with the sum of code products exact.

    Args:
        a: int8 ``[M, K]``, values in [-127, 127].
        b: integer ``[N, K]`` (int8, int16 or int32) of any magnitude that int32 sums
            hold; backends that need 8-bit operands split it into digits.
        scale: float32 ``[N]`` (or a 0-d tensor), multiplied into each column; powers of
            two keep the result exact.
        bias: float32 ``[N]``, added last (one float32 rounding, as a float32 layer).
        a_nonneg: the caller knows every code of ``a`` is >= 0 (a cheaper oneDNN call).
        backend_name: one of :data:`BACKENDS`, used as named. Default: :func:`backend`
            for ``a``'s device, and float32 for products under :data:`MIN_INT8_MACS`.
    """
    if a.dtype != torch.int8:
        raise TypeError(f"matmul_codes expects int8 codes for a, got {a.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"matmul_codes: shapes {tuple(a.shape)} @ {tuple(b.shape)}.T do not match")
    name = backend_name
    if name is None:
        name = backend(a.device)
        if a.shape[0] * a.shape[1] * b.shape[0] < MIN_INT8_MACS:
            name = "float"
    if name == "onednn":
        return _onednn(a, b, scale, bias, a_nonneg)
    if name == "int_mm":
        out = _int_mm(a, b)
    elif name == "float":
        out = a.to(torch.float32) @ b.to(torch.float32).t()
    else:
        raise ValueError(f"unknown int8 backend {name!r}; choose one of {BACKENDS}")
    if scale is not None:
        out = out.mul_(scale)
    if bias is not None:
        out = out.add_(bias)
    return out


def conv2d_codes(
    x: Tensor,
    w: Tensor,
    *,
    scale: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    x_nonneg: bool,
    backend_name: str | None = None,
) -> Tensor | None:
    """A direct convolution of codes, where the backend has one; else None.

    ``conv2d(x, w) * scale + bias`` for int8 ``x [N, C, H, W]`` and ``w [O, C, kh, kw]``
    (one group, zero padding), ``scale [O]`` float32, sums exact as in
    :func:`matmul_codes`: oneDNN's quantized convolution, which reads ``x`` in place
    where the im2col product copies every window first, for non-negative ``x`` (u8,
    no pair can saturate). The result is ``[N, O, Ho, Wo]`` in channels-last memory.
    """
    name = backend_name
    if name is None:
        name = backend(x.device)
        out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
        out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
        if x.shape[0] * out_h * out_w * w[0].numel() * w.shape[0] < MIN_INT8_MACS:
            return None
    if name != "onednn" or not x_nonneg:
        return None
    scale = scale.to(torch.float32).expand(w.shape[0]).contiguous()
    zero_points = torch.zeros(w.shape[0], dtype=torch.int64, device=x.device)
    geometry = (list(stride), list(padding), list(dilation), 1)
    packed = torch.ops.onednn.qconv_prepack(w.contiguous(), scale, 1.0, 0, *geometry, None)
    return torch.ops.onednn.qconv2d_pointwise(
        x.contiguous().view(torch.uint8),
        1.0,
        0,
        packed,
        scale,
        zero_points,
        bias.to(torch.float32) if bias is not None else None,
        *geometry,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def digits(b: Tensor, base_bits: int) -> list[Tensor]:
    """``b`` as int8 digits of base ``2**base_bits``, least significant first.

    Every digit but the last lies in ``[0, 2**base_bits)``; the last one, signed, in
    ``[-2**base_bits, 2**base_bits)``; ``sum(d * 2**(base_bits * i))`` is ``b``. One
    digit when ``b`` already fits. Reads ``b``'s range back to the host.
    """
    if b.dtype == torch.int8 and base_bits >= 7:
        return [b]  # int8 fits one digit: no need to read its range
    wide = b.to(torch.int32)
    low, high = int(wide.min()), int(wide.max())
    limit = 1 << base_bits
    count = 1
    while not (
        -(limit << (base_bits * (count - 1))) <= low and high < limit << (base_bits * (count - 1))
    ):
        count += 1
    parts = []
    for index in range(count):
        if index == count - 1:
            parts.append((wide >> (base_bits * index)).to(torch.int8))
        else:
            parts.append(((wide >> (base_bits * index)) & (limit - 1)).to(torch.int8))
    return parts


def _split_columns(b: Tensor, base_bits: int, scale: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """``b``'s digits stacked as column blocks, each block's scale, and the digit count."""
    parts = digits(b, base_bits)
    columns = b.shape[0]
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=b.device)
    scale = scale.to(torch.float32).expand(columns)
    scales = [scale * float(1 << (base_bits * index)) for index in range(len(parts))]
    return torch.cat(parts), torch.cat(scales), len(parts)


def _onednn(
    a: Tensor, b: Tensor, scale: Tensor | None, bias: Tensor | None, a_nonneg: bool
) -> Tensor:
    """oneDNN's u8 x s8 quantized linear, with no 16-bit pair sum able to saturate."""
    if a_nonneg:
        # u8 0..127 against s8 -128..127: |pair| <= 2 * 127 * 128 < 2**15.
        src, zero_point, base_bits = a.view(torch.uint8), 0, 7
    else:
        # a + 128 (the sign bit flipped) in 1..255 against digits in [-64, 64), unless
        # the CPU sums u8 x s8 products in 32 bits (VNNI): then full int8 digits.
        src, zero_point = a.view(torch.uint8) ^ 0x80, 128
        base_bits = 6 if _onednn_saturates() else 7
    weight, scales, count = _split_columns(b, base_bits, scale)
    columns = b.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.int64, device=a.device)
    fused_bias = bias.to(torch.float32) if bias is not None and count == 1 else None
    out = torch.ops.onednn.qlinear_pointwise(
        src.contiguous(),
        1.0,
        zero_point,
        packed,
        scales,
        zero_points,
        fused_bias,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )
    if count > 1:
        # Each block is exact below 2**24. Two blocks: one float32 addition is the exact
        # sum rounded once. More: their sum is formed in float64 and rounded once.
        blocks = out.view(out.shape[0], count, columns)
        if count == 2:
            out = blocks[:, 0] + blocks[:, 1]
        else:
            out = blocks.to(torch.float64).sum(dim=1).to(torch.float32)
        if bias is not None:
            out = out.add_(bias)
    return out


def _onednn_saturates() -> bool:
    """Whether oneDNN's u8 x s8 product saturates pairs of products in 16 bits here."""
    if not _ONEDNN_SATURATES:
        a = torch.full((1, 64), 127, dtype=torch.int8)
        b = torch.full((8, 64), 127, dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(b, None)
        out = torch.ops.onednn.qlinear_pointwise(
            a.view(torch.uint8) ^ 0x80,
            1.0,
            128,
            packed,
            torch.ones(8),
            torch.zeros(8, dtype=torch.int64),
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        _ONEDNN_SATURATES.append(not bool((out == 64 * 127 * 127).all()))
    return _ONEDNN_SATURATES[0]


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm`` over ``b``'s base-128 digits, padded where CUDA needs it."""
    parts = digits(b, 7)
    weight = torch.cat(parts) if len(parts) > 1 else parts[0]
    rows, inner, columns = a.shape[0], a.shape[1], weight.shape[0]
    if a.device.type == "cuda":
        # cuBLASLt's int8 product: more than 16 rows, inner and outer sizes multiples of 8.
        pad_rows = max(0, 17 - rows)
        pad_inner = -inner % 8
        pad_columns = -columns % 8
        if pad_rows or pad_inner:
            a = torch.nn.functional.pad(a, (0, pad_inner, 0, pad_rows))
        if pad_inner or pad_columns:
            weight = torch.nn.functional.pad(weight, (0, pad_inner, 0, pad_columns))
    product = torch._int_mm(a.contiguous(), weight.contiguous().t())[:rows, :columns]
    if len(parts) == 1:
        return product.to(torch.float32)
    # The digits' int32 sums combined exactly in int64, then rounded to float32 once.
    blocks = product.view(rows, len(parts), b.shape[0]).to(torch.int64)
    total = blocks[:, 0]
    for index in range(1, len(parts)):
        total = total + (blocks[:, index] << (7 * index))
    return total.to(torch.float32)


def available(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether backend ``name`` runs on ``device`` and gives exact sums on a probe."""
    device = torch.device(device)
    if name == "float":
        return True
    if name == "onednn" and (device.type != "cpu" or not hasattr(torch.ops, "onednn")):
        return False
    try:
        return _exact(name, device)
    except Exception:  # an op missing from this torch build, or refusing these shapes
        return False


def _exact(name: str, device: torch.device) -> bool:
    """The backend against a float64 reference, at full code range (the saturating case)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (40, 96), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 96), generator=generator, dtype=torch.int8)
    a[0], b[0] = 127, -127  # the largest pairs
    wide = torch.randint(-3000, 3000, (24, 96), generator=generator, dtype=torch.int32)
    cases = [(a, b, False), (a.abs(), b, True), (a, wide, False)]
    for left, right, nonneg in cases:
        expected = left.double() @ right.double().t()
        got = matmul_codes(
            left.to(device), right.to(device), a_nonneg=nonneg, backend_name=name
        ).double()
        if not torch.equal(got.cpu(), expected):
            return False
    return True


def _median_seconds(function: Callable[[], object], sync: Callable[[], None]) -> float:
    function()
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def probe(device: torch.device | str = "cpu") -> dict[str, float]:
    """Seconds of the probe product for the exact backends on ``device`` (``float`` too).

    Every exact backend is first timed on :data:`SCREEN_SHAPE`; one more than four
    times slower than float32 there (a reference loop) gets ``inf`` and is left out of
    the timing on :data:`PROBE_SHAPE`, which decides: with a non-negative ``a`` (a ReLU's
    output, under ``name``) and a signed one (an error, under ``name + ":signed"``).
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(1)

    def operands(shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        rows, inner, columns = shape
        a = torch.randint(-127, 128, (rows, inner), generator=generator, dtype=torch.int8)
        b = torch.randint(-127, 128, (columns, inner), generator=generator, dtype=torch.int8)
        return a.to(device), b.to(device)

    def seconds_of(name: str, a: Tensor, b: Tensor, nonneg: bool) -> float:
        return _median_seconds(lambda: matmul_codes(a, b, a_nonneg=nonneg, backend_name=name), sync)

    exact = [name for name in BACKENDS if available(name, device)]
    a, b = operands(SCREEN_SHAPE)
    screen = {name: seconds_of(name, a.abs(), b, True) for name in exact}
    fast = [name for name in exact if screen[name] <= 4 * screen["float"]]
    a, b = operands(PROBE_SHAPE)
    seconds = {}
    for name in exact:
        if name not in fast:
            seconds[name] = seconds[name + ":signed"] = math.inf
            continue
        seconds[name] = seconds_of(name, a.abs(), b, True)
        seconds[name + ":signed"] = seconds_of(name, a, b, False)
    return seconds


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` found for a device: the backend, why, whether its products
    with a signed left operand (errors) beat float32 too (not where oneDNN saturates),
    and whether it was forced (then it takes every product, however small)."""

    backend: str
    why: str
    signed_fast: bool
    forced: bool = False


def product_backend(
    device: torch.device | str, macs: int, *, direct: bool = False, signed: bool = False
) -> str | None:
    """The backend that should run a product of ``macs`` multiply-adds in int8 on
    ``device``, or None where float32 is as fast (small products; signed ones where
    :func:`signed_products_fast` says no; no fast int8 product at all).

    Args:
        direct: the product is a convolution oneDNN can run directly (non-negative
            input), which pays from :data:`MIN_DIRECT_MACS`; others from
            :data:`MIN_INT8_MACS`.
        signed: its left operand is signed (an error).
    """
    device = torch.device(device)
    choose(device)
    choice = _CHOICE[device.type]
    if choice.forced:
        return choice.backend
    if choice.backend == "float" or (signed and not choice.signed_fast):
        return None
    limit = MIN_DIRECT_MACS if direct and choice.backend == "onednn" else MIN_INT8_MACS
    return choice.backend if macs >= limit else None


def backend(device: torch.device | str = "cpu") -> str:
    """The int8 backend for ``device``: :func:`choose`'s pick, cached per process."""
    return choose(device)[0]


def signed_products_fast(device: torch.device | str = "cpu") -> bool:
    """Whether int8 products with a signed left operand beat float32 on ``device``.

    Where they do not (oneDNN on a CPU without VNNI splits the right operand in two),
    the integer engine computes input gradients, whose left operand is the error, in
    float32 as the emulated engine does.
    """
    choose(device)
    return _CHOICE[torch.device(device).type].signed_fast


def choose(device: torch.device | str = "cpu") -> tuple[str, str]:
    """``(backend, why)`` for ``device``, probed once per process and device type.

    ``FEDLPT_INT8_BACKEND`` (one of :data:`BACKENDS`) forces the backend, for every
    product. Otherwise the fastest exact int8 backend wins if it takes at most
    :data:`MIN_SPEEDUP` of float32's time on the probe, else ``"float"``. ``why`` says
    what was measured.
    """
    device = torch.device(device)
    key = device.type
    with _CHOICE_LOCK:
        if key not in _CHOICE:
            _CHOICE[key] = _choice(device)
            _LOG.info(
                "fedlpt: int8 products on %s use %s (%s)",
                key,
                _CHOICE[key].backend,
                _CHOICE[key].why,
            )
        choice = _CHOICE[key]
        return choice.backend, choice.why


def _choice(device: torch.device) -> Choice:
    forced = os.environ.get(ENV_BACKEND, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r} must be one of {BACKENDS}")
        if not available(forced, device):
            raise ValueError(
                f"{ENV_BACKEND}={forced!r}: that backend is not exact or not present on "
                f"{device.type} here"
            )
        return Choice(forced, f"forced by {ENV_BACKEND}", signed_fast=True, forced=True)
    return _pick(probe(device))


def _pick(seconds: dict[str, float]) -> Choice:
    float_s = seconds["float"]
    names = [name for name in seconds if ":" not in name]
    timings = ", ".join(
        f"{name} {seconds[name] * 1e3:.2f} ms"
        if math.isfinite(seconds[name])
        else f"{name} slow (a reference loop)"
        for name in names
    )
    fast = [name for name in names if name != "float" and seconds[name] <= MIN_SPEEDUP * float_s]
    if not fast:
        return Choice(
            "float",
            f"no exact int8 product at most {MIN_SPEEDUP}x float32's time: {timings}",
            False,
        )
    best = min(fast, key=seconds.__getitem__)
    signed = seconds.get(best + ":signed", seconds[best]) / float_s
    why = (
        f"{seconds[best] / float_s:.2f}x float32 on the probe, {signed:.2f}x with a signed "
        f"left operand: {timings}"
    )
    return Choice(best, why, signed_fast=signed <= SIGNED_SPEEDUP)


def forget_choice() -> None:
    """Probe again at the next :func:`choose` (tests, or after changing the thread count)."""
    with _CHOICE_LOCK:
        _CHOICE.clear()
