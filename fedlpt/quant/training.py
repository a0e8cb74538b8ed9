"""Low-precision training: a recipe of formats, activation/error quantizers, an optimizer wrapper.

As in the paper (and QPyTorch's ``OptimLP``), every quantity that the paper keeps in low
precision is rounded onto its BFP grid (stochastic rounding draws its seeds from one
generator). Two engines compute with those values (:func:`select_engine`): the emulated
one multiplies float32 copies, as the paper's code does; the integer one
(:mod:`fedlpt.quant.integer`) multiplies the int8 codes and keeps them for backward, with
the same results. What is rounded, and where:

* activations after every conv, linear, activation and pooling module (forward), and the
  errors flowing back through the same points (backward), by :func:`prepare` (which skips
  the error roundings it can prove change nothing, see :func:`errors_arriving_on_grid`);
* gradients before the optimizer step, weights after it (no FP32 master copy), and, when
  asked, the optimizer's state (SGD momentum, Adam moments), by :class:`LowPrecisionOptimizer`,
  each kind in one batched call.

The hot path never reads a value back from the device: a NaN or an Inf is not checked
at every rounding but shows in the loss, which the training loop checks once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from itertools import pairwise
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from . import gemm
from .bfp import BFP, BlockKind, draw_seed, quantize, quantize_tensors_
from .integer import MAX_BITS, mark_on_grid, prepare_integer, unprepare_integer

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
ENGINES = ("auto", "integer", "emulated")
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowPrecision:
    """One BFP format (or ``None`` for FP32) per role of a low-precision training step.

    Args:
        weight: format the weights are rounded to after every step; also the upload format.
        activation: format of activations after conv/linear/activation/pooling modules.
        error: format of the back-propagated errors at the same points.
        gradient: format of parameter gradients before the optimizer step.
        optimizer_state: format of optimizer state tensors (momentum, Adam moments).
    """

    weight: BFP | None = None
    activation: BFP | None = None
    error: BFP | None = None
    gradient: BFP | None = None
    optimizer_state: BFP | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and not isinstance(value, BFP):
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

    @classmethod
    def from_roles(
        cls,
        bits: Mapping[str, int],
        *,
        block: BlockKind,
        rounding: str,
        quantize_optimizer_state: bool = False,
    ) -> LowPrecision:
        """The paper's recipe from one word length per role (``weight``, ``activation``,
        ``error``, ``gradient``; 32: FP32).

        Weights, gradients (and optimizer state, when asked) share ``block``; activations
        and errors take one exponent per tensor, as in the paper.
        """

        def fmt(role_bits: int, kind: BlockKind) -> BFP | None:
            return None if role_bits == 32 else BFP(role_bits, kind, rounding)  # type: ignore[arg-type]

        weight = fmt(bits["weight"], block)
        return cls(
            weight=weight,
            activation=fmt(bits["activation"], "tensor"),
            error=fmt(bits["error"], "tensor"),
            gradient=fmt(bits["gradient"], block),
            optimizer_state=weight if quantize_optimizer_state else None,
        )

    @property
    def is_fp32(self) -> bool:
        """Whether no role is quantized."""
        return all(getattr(self, f.name) is None for f in fields(self))


class _QuantizeActivation(torch.autograd.Function):
    """Identity whose forward rounds the activation and whose backward rounds the error."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        activation: BFP | None,
        error: BFP | None,
        generator: torch.Generator | None,
        error_on_grid: bool,
    ) -> Tensor:
        ctx.error, ctx.generator, ctx.error_on_grid = error, generator, error_on_grid
        if activation is None:
            return x.view_as(x)
        return quantize(x, activation, generator, check=False)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        if ctx.error is not None:
            if ctx.error_on_grid:
                # The rounding would return ``grad`` unchanged; its seed is still drawn so
                # that every later draw, and so the whole run, stays the same bit for bit.
                draw_seed(ctx.generator)
            else:
                grad = quantize(grad, ctx.error, ctx.generator, check=False)
        return grad, None, None, None, None


def quantize_activation(
    x: Tensor,
    activation: BFP | None,
    error: BFP | None,
    generator: torch.Generator | None = None,
    *,
    error_on_grid: bool = False,
) -> Tensor:
    """``x`` rounded to ``activation``; its gradient is rounded to ``error`` on the way back.

    Args:
        error_on_grid: the caller guarantees that every error arriving here already lies
            on the ``error`` grid, so its rounding is the identity: it is skipped (its seed
            still drawn). :func:`prepare` sets it where :func:`errors_arriving_on_grid`
            proves it.
    """
    return _QuantizeActivation.apply(x, activation, error, generator, error_on_grid)


def _per_dim(value: int | tuple[int, ...] | list[int], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _divides_error_exactly(module: nn.Module) -> bool:
    """Whether ``module``'s backward maps every error value ``g`` to ``g / 2**k`` or 0.

    True for an average pooling (exactly ``nn.AvgPool1d`` / ``nn.AvgPool2d``, whose
    forward is torch's own) with non-overlapping windows of a power-of-two size, no
    padding, no ceil mode and no divisor override: each input element lies in at most one
    window and receives that window's error divided by its size, a float32 division by a
    power of two (exact above the subnormal range).
    """
    if type(module) not in (nn.AvgPool1d, nn.AvgPool2d):
        return False
    dims = 1 if type(module) is nn.AvgPool1d else 2
    kernel = _per_dim(module.kernel_size, dims)
    stride = _per_dim(module.stride if module.stride is not None else kernel, dims)  # type: ignore[arg-type]
    window = prod(kernel)
    return (
        kernel == stride
        and all(p == 0 for p in _per_dim(module.padding, dims))  # type: ignore[arg-type]
        and not module.ceil_mode
        and getattr(module, "divisor_override", None) is None  # AvgPool1d has none
        and window & (window - 1) == 0
    )


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def pooled_pairs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, pooling)`` of each quantized module whose output feeds only an exact
    average pooling (:func:`_divides_error_exactly`), that pooling quantized too.

    The module must sit right before the pooling inside an ``nn.Sequential`` that runs
    torch's own forward, occur once in the model and carry no hooks (neither may the
    pooling). :func:`errors_arriving_on_grid` and the integer engine's fused
    ReLU + pooling build on it.
    """
    occurrences: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        occurrences[id(module)] = occurrences.get(id(module), 0) + 1
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for container in model.modules():
        if not isinstance(container, nn.Sequential) or type(container).forward is not (
            nn.Sequential.forward
        ):
            continue
        for module, following in pairwise(container.children()):
            if (
                isinstance(module, QUANTIZED_MODULES)
                and isinstance(following, QUANTIZED_MODULES)
                and _divides_error_exactly(following)
                and occurrences[id(module)] == 1
                and not _has_hooks(module)
                and not _has_hooks(following)
            ):
                found.append((names[id(module)], following))
    return found


def errors_arriving_on_grid(model: nn.Module, error: BFP | None) -> list[str]:
    """Names of the quantized modules whose output error provably arrives on ``error``'s grid.

    A quantized module ``m`` qualifies when, inside an ``nn.Sequential`` that runs torch's
    own forward, the next module is an exact average pooling
    (:func:`_divides_error_exactly`) that is quantized too, ``m`` occurs once in the model
    and neither carries hooks yet. Then ``m``'s output feeds only the pooling, whose own
    quantizer rounds the error first; the pooling's backward divides those grid values by
    a power of two, and the result lies on the grid of the same format (the largest value
    and every step scale together; tensor, row and kernel blocks keep their blocks). The
    paper's ConvNet has three such points (each ReLU before its pooling): about a fifth of
    the activation and error values of a 28x28 step.

    The one exception is a pooled error whose largest magnitude is below ``2**(k - 126)``
    for windows of ``2**k`` values (``2**-124`` for 2x2): divided, it falls below float32's
    normal range, where the rounding's exponent stops at -126 and would have moved the
    lowest bits. Integer block sizes are never skipped (the pooling regroups blocks).
    Hooks or forward calls added after :func:`prepare` that use ``m``'s output elsewhere
    void the proof; unprepare and prepare again after changing the model.
    """
    if error is None or not isinstance(error.block, str):
        return []
    return [name for name, _ in pooled_pairs(model)]


def integer_blockers(recipe: LowPrecision) -> list[str]:
    """Why ``recipe`` cannot run on the integer engine (empty: it can).

    The engine multiplies int8 codes: activations, errors and weights must each be
    quantized to at most 8 bits, activations and errors with one exponent per tensor,
    weights with one per tensor or per row (output channel). The paper's ``kernel``
    blocks, or int blocks, put exponents along the reduction of every product.
    """
    reasons = []
    for role in ("activation", "error", "weight"):
        fmt: BFP | None = getattr(recipe, role)
        if fmt is None:
            reasons.append(f"the {role}s are FP32")
        elif fmt.bits > MAX_BITS:
            reasons.append(f"{role} bits {fmt.bits} > {MAX_BITS} (the engine's codes are int8)")
    for role in ("activation", "error"):
        fmt = getattr(recipe, role)
        if fmt is not None and fmt.block != "tensor":
            reasons.append(f"{role}s share exponents by {fmt.block!r}, not one per tensor")
    if recipe.weight is not None and recipe.weight.block not in ("tensor", "row"):
        reasons.append(
            f"weight block {recipe.weight.block!r} puts exponents along the reduction of "
            "every product (the engine takes 'tensor' or 'row')"
        )
    return reasons


def select_engine(
    recipe: LowPrecision, engine: str = "auto", device: torch.device | str = "cpu"
) -> tuple[str, str]:
    """``("integer" | "emulated", why)`` for ``recipe`` on ``device``.

    ``"auto"`` takes the integer engine where the recipe allows it
    (:func:`integer_blockers`) and the device multiplies int8 codes exactly and faster
    than float32 (:func:`fedlpt.quant.gemm.choose`, probed once per process), else the
    emulated one. ``"integer"`` where the recipe does not allow it raises ValueError
    naming why; on a device without a fast int8 product it still runs (the memory
    saving stays), its products in float32.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "emulated":
        return "emulated", "asked for"
    blockers = integer_blockers(recipe)
    if engine == "integer":
        if blockers:
            raise ValueError("engine='integer' cannot run this recipe: " + "; ".join(blockers))
        name, why = gemm.choose(device)
        return "integer", f"int8 products by {name} ({why})"
    if blockers:
        return "emulated", "; ".join(blockers)
    name, why = gemm.choose(device)
    if name == "float":
        return "emulated", why
    return "integer", f"int8 products by {name} ({why})"


@functools.cache
def _log_engine(engine: str, why: str) -> None:
    _LOG.info("fedlpt: low-precision training runs on the %s engine: %s", engine, why)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def prepare(
    model: nn.Module,
    recipe: LowPrecision,
    generator: torch.Generator | None = None,
    *,
    engine: str = "auto",
    skip_identity_roundings: bool = True,
) -> nn.Module:
    """Insert activation/error quantizers after every quantized module of ``model``, in place.

    Parameters, buffers and ``state_dict`` keys stay exactly those of the plain model.
    The model's input is not quantized. Returns ``model``; ``model.fedlpt_engine`` names
    the engine it runs on.

    Args:
        engine: ``"auto"`` (default), ``"integer"`` or ``"emulated"``, see
            :func:`select_engine` (the choice is logged once). The emulated engine adds
            forward hooks; the integer engine replaces the forward of the modules it
            implements (:mod:`fedlpt.quant.integer`) and expects the weights on the
            recipe's weight grid, as :class:`LowPrecisionOptimizer` keeps them.
        skip_identity_roundings: skip the error roundings that
            :func:`errors_arriving_on_grid` proves to be the identity (their seeds are
            still drawn): the results are the same bit for bit, the step is shorter.
    """
    if getattr(model, "_fedlpt_hooks", None):
        raise ValueError("model is already prepared for low-precision training")
    handles: list[Any] = []
    chosen = "emulated"
    if recipe.activation is not None or recipe.error is not None:
        chosen, why = select_engine(recipe, engine, _device_of(model))
        _log_engine(chosen, why)
        activation, error = recipe.activation, recipe.error
        on_grid = set(errors_arriving_on_grid(model, error)) if skip_identity_roundings else set()
        if chosen == "integer":
            assert activation is not None  # integer_blockers guarantees it
            handles = prepare_integer(
                model,
                quantized=QUANTIZED_MODULES,
                activation=activation,
                error=error,
                weight=recipe.weight,
                generator=generator,
                errors_on_grid=on_grid,
                pools_after=dict(pooled_pairs(model)),
            )
        else:

            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
                return quantize_activation(output, activation, error, generator)

            def hook_on_grid(
                module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor
            ) -> Tensor:
                return quantize_activation(output, activation, error, generator, error_on_grid=True)

            for name, module in model.named_modules():
                if isinstance(module, QUANTIZED_MODULES):
                    chosen_hook = hook_on_grid if name in on_grid else hook
                    handles.append(module.register_forward_hook(chosen_hook))
    elif engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    model._fedlpt_hooks = handles  # type: ignore[assignment]
    model.fedlpt_engine = chosen  # type: ignore[assignment]
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Remove the quantizers :func:`prepare` inserted; returns ``model``."""
    handles = getattr(model, "_fedlpt_hooks", [])
    if getattr(model, "fedlpt_engine", "emulated") == "integer":
        unprepare_integer(handles)
    else:
        for handle in handles:
            handle.remove()
    model._fedlpt_hooks = []  # type: ignore[assignment]
    return model


class LowPrecisionOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer so that its step runs in low precision.

    Before the wrapped step every gradient is rounded to ``recipe.gradient``; after it
    every parameter is overwritten with its ``recipe.weight`` value (no FP32 master copy)
    and, if ``recipe.optimizer_state`` is set, every floating state tensor shaped like its
    parameter is rounded too; each of these is one batched call. Parameters are rounded
    once on wrapping, so the first forward pass already sees low-precision weights.

    It is a real ``torch.optim.Optimizer`` sharing the wrapped optimizer's
    ``param_groups`` and ``state`` (the same objects): learning-rate schedulers, step
    hooks and ``state_dict`` / ``load_state_dict`` work on it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        recipe: LowPrecision,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.recipe = recipe
        self.generator = generator
        super().__init__(optimizer.param_groups, optimizer.defaults)
        # Share, not copy: the base __init__ rebuilt the groups; point at the inner ones.
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._quantize_params(recipe.weight)

    def _params(self) -> list[Tensor]:
        return [
            p
            for group in self.param_groups
            for p in group["params"]
            if p.is_floating_point() and p.numel()
        ]

    @torch.no_grad()
    def _quantize_params(self, fmt: BFP | None) -> None:
        if fmt is not None:
            params = self._params()
            quantize_tensors_(params, fmt, self.generator, check=False)
            # The integer engine then reads their codes without checking them.
            mark_on_grid(params, fmt)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Round gradients, take the wrapped step, round weights (and state)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.recipe.gradient is not None:
            grads = [p.grad for p in self._params() if p.grad is not None]
            quantize_tensors_(grads, self.recipe.gradient, self.generator, check=False)
        self.optimizer.step()
        self._quantize_params(self.recipe.weight)
        state_fmt = self.recipe.optimizer_state
        if state_fmt is not None:
            states = [
                value
                for param in self._params()
                for value in self.optimizer.state.get(param, {}).values()
                if isinstance(value, Tensor)
                and value.is_floating_point()
                and value.shape == param.shape
                and value.numel()
            ]
            quantize_tensors_(states, state_fmt, self.generator, check=False)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the wrapped optimizer's parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped optimizer's state dict; the two keep sharing their state."""
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        return f"LowPrecisionOptimizer({self.optimizer!r}, {self.recipe!r})"
