"""Low-precision training: a recipe of formats, activation/error quantizers, an optimizer wrapper.

As in the paper (and QPyTorch's ``OptimLP``), arithmetic is simulated in float32 but every
quantity that the paper keeps in low precision is rounded onto its BFP grid:

* activations after every conv, linear, activation and pooling module (forward), and the
  errors flowing back through the same points (backward), by :func:`prepare`;
* gradients before the optimizer step, weights after it (no FP32 master copy), and, when
  asked, the optimizer's state (SGD momentum, Adam moments), by :class:`LowPrecisionOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .bfp import BFP, DITHER_BITS, BlockKind, quantize, quantize_

# Modules after which the paper quantizes the activation (and, backwards, the error).
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)
_POOLING = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
QUANTIZED_MODULES: tuple[type[nn.Module], ...] = _WEIGHTED + _ACTIVATIONS + _POOLING
# Their backward does not read their own output, so the quantizer may overwrite it in place
# and save an allocation (ReLU, Sigmoid and Tanh keep their output for the backward).
_OUTPUT_NOT_SAVED: tuple[type[nn.Module], ...] = _WEIGHTED + _POOLING


@dataclass(frozen=True)
class LowPrecision:
    """One BFP format (or ``None`` for FP32) per role of a low-precision training step.

    Args:
        weight: format the weights are rounded to after every step; also the upload format.
        activation: format of activations after conv/linear/activation/pooling modules.
        error: format of the back-propagated errors at the same points.
        gradient: format of parameter gradients before the optimizer step.
        optimizer_state: format of optimizer state tensors (momentum, Adam moments).
        dither_bits: random bits drawn per element when activations and errors are rounded
            stochastically: 8 (7 random, rounding probabilities exact to 1/128; half the
            cost) or 16. Weights, gradients and optimizer state always draw 16, because
            updates far below one step survive only through exact probabilities.
    """

    weight: BFP | None = None
    activation: BFP | None = None
    error: BFP | None = None
    gradient: BFP | None = None
    optimizer_state: BFP | None = None
    dither_bits: int = 8

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "dither_bits":
                if value not in DITHER_BITS:
                    raise ValueError(
                        f"LowPrecision.dither_bits must be one of {DITHER_BITS}, got {value!r}"
                    )
            elif value is not None and not isinstance(value, BFP):
                raise TypeError(f"LowPrecision.{field.name} must be a BFP or None, got {value!r}")

    @classmethod
    def uniform(
        cls,
        bits: int | None,
        *,
        block: BlockKind = "row",
        rounding: str = "stochastic",
        quantize_optimizer_state: bool = False,
    ) -> LowPrecision:
        """The paper's recipe from one bit width; ``None`` or 32 gives the FP32 baseline.

        Weights and gradients use ``block``; activations and errors one exponent per
        tensor, as in the paper.
        """
        if bits is None or bits == 32:
            return cls()
        tensor_fmt = BFP(bits, "tensor", rounding)  # type: ignore[arg-type]
        param_fmt = BFP(bits, block, rounding)  # type: ignore[arg-type]
        return cls(
            weight=param_fmt,
            activation=tensor_fmt,
            error=tensor_fmt,
            gradient=param_fmt,
            optimizer_state=param_fmt if quantize_optimizer_state else None,
        )

    @property
    def is_fp32(self) -> bool:
        """Whether no role is quantized."""
        return all(getattr(self, f.name) is None for f in fields(self) if f.name != "dither_bits")


class _QuantizeActivation(torch.autograd.Function):
    """Identity whose forward rounds the activation and whose backward rounds the error."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        activation: BFP | None,
        error: BFP | None,
        generator: torch.Generator | None,
        in_place: bool,
        dither_bits: int,
    ) -> Tensor:
        ctx.error, ctx.generator, ctx.dither_bits = error, generator, dither_bits
        if activation is None:
            return x.view_as(x)
        if in_place and x.dtype == torch.float32 and x.is_contiguous():
            ctx.mark_dirty(x)
            return quantize_(x, activation, generator, dither_bits=dither_bits)
        return quantize(x, activation, generator, dither_bits=dither_bits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:  # type: ignore[override]
        # Out of place: autograd may hand the same gradient tensor to several branches.
        if ctx.error is not None:
            grad = quantize(grad, ctx.error, ctx.generator, dither_bits=ctx.dither_bits)
        return grad, None, None, None, None, None


def quantize_activation(
    x: Tensor,
    activation: BFP | None,
    error: BFP | None,
    generator: torch.Generator | None = None,
    *,
    in_place: bool = False,
    dither_bits: int = 16,
) -> Tensor:
    """``x`` rounded to ``activation``; its gradient is rounded to ``error`` on the way back.

    ``in_place=True`` overwrites ``x`` (only where nothing else needs its old value);
    ``dither_bits`` is passed to :func:`quantize`.
    """
    return _QuantizeActivation.apply(x, activation, error, generator, in_place, dither_bits)


def prepare(
    model: nn.Module, recipe: LowPrecision, generator: torch.Generator | None = None
) -> nn.Module:
    """Insert activation/error quantizers after every quantized module of ``model``, in place.

    Uses forward hooks, so parameters, buffers and ``state_dict`` keys stay exactly those
    of the plain model. The model's input is not quantized. Returns ``model``.
    """
    if getattr(model, "_fedlpt_hooks", None):
        raise ValueError("model is already prepared for low-precision training")
    handles = []
    if recipe.activation is not None or recipe.error is not None:
        activation, error, dither_bits = recipe.activation, recipe.error, recipe.dither_bits

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            in_place = isinstance(module, _OUTPUT_NOT_SAVED)
            return quantize_activation(
                output, activation, error, generator, in_place=in_place, dither_bits=dither_bits
            )

        for module in model.modules():
            if isinstance(module, QUANTIZED_MODULES):
                handles.append(module.register_forward_hook(hook))
    model._fedlpt_hooks = handles  # type: ignore[assignment]
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Remove the quantizers :func:`prepare` inserted; returns ``model``."""
    for handle in getattr(model, "_fedlpt_hooks", []):
        handle.remove()
    model._fedlpt_hooks = []  # type: ignore[assignment]
    return model


class LowPrecisionOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer so that its step runs in low precision.

    Before the wrapped step every gradient is rounded to ``recipe.gradient``; after it
    every parameter is overwritten with its ``recipe.weight`` value (no FP32 master copy)
    and, if ``recipe.optimizer_state`` is set, every floating state tensor shaped like its
    parameter is rounded too. Parameters are rounded once on wrapping, so the first
    forward pass already sees low-precision weights.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        recipe: LowPrecision,
        generator: torch.Generator | None = None,
    ) -> None:
        # Share, not copy, the inner optimizer's state so schedulers and checkpoints work.
        self.optimizer = optimizer
        self.recipe = recipe
        self.generator = generator
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        self._quantize_params(recipe.weight)

    def _params(self) -> Iterable[nn.Parameter]:
        for group in self.param_groups:
            yield from group["params"]

    @torch.no_grad()
    def _quantize_params(self, fmt: BFP | None) -> None:
        if fmt is None:
            return
        for param in self._params():
            if param.is_floating_point() and param.numel():
                quantize_(param.data, fmt, self.generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Round gradients, take the wrapped step, round weights (and state)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.recipe.gradient is not None:
            for param in self._params():
                if param.grad is not None and param.grad.numel():
                    quantize_(param.grad, self.recipe.gradient, self.generator)
        self.optimizer.step()
        self._quantize_params(self.recipe.weight)
        state_fmt = self.recipe.optimizer_state
        if state_fmt is not None:
            for param in self._params():
                for value in self.optimizer.state.get(param, {}).values():
                    if (
                        isinstance(value, Tensor)
                        and value.is_floating_point()
                        and value.shape == param.shape
                        and value.numel()
                    ):
                        quantize_(value, state_fmt, self.generator)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the wrapped optimizer's parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped optimizer's state dict."""
        self.optimizer.load_state_dict(state_dict)
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups

    def __repr__(self) -> str:
        return f"LowPrecisionOptimizer({self.optimizer!r}, {self.recipe!r})"
