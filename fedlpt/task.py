"""Local training and evaluation: what a client does with its data in one round.

As in Flower's quickstart, the task is the home of the model and its training loop.
:class:`LocalTrainer` is the one place a low-precision training step is assembled
(model prepared with activation/error quantizers, optimizer wrapped); :func:`train`
runs it over a loader and the training benchmark times it step by step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import allocator, models
from .data.catalog import dataset_info
from .quant.bfp import BlockKind
from .quant.training import LowPrecision, LowPrecisionOptimizer, prepare, unprepare

OPTIMIZERS = ("adam", "sgd")
# Long local training logs a line this often, so a node's log shows it is alive.
PROGRESS_EVERY_S = 30.0

logger = logging.getLogger("flwr")


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`: mean loss over all steps, examples seen, steps taken,
    and the low-precision engine that ran them (``"integer"`` or ``"emulated"``)."""

    loss: float
    num_examples: int
    steps: int
    engine: str = "emulated"


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], *, lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """Build ``"adam"`` (the paper: lr 1e-3) or ``"sgd"`` (with optional momentum)."""
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def proximal_term(model: nn.Module, global_params: Mapping[str, Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the model's parameters (a scalar)."""
    total = sum(
        (param - global_params[name]).pow(2).sum() for name, param in model.named_parameters()
    )
    return 0.5 * mu * total


class LocalTrainer:
    """A model set up for low-precision training: quantizers inserted, optimizer wrapped.

    Use as a context manager (or call :meth:`close`): on exit the model is left plain
    (quantizers removed). ``step`` runs one training step; ``loss`` and ``optimizer``
    are public so that a benchmark can time the phases of a step apart. Training runs on
    the device the model is on: batches are moved there. On the CPU, memory freed
    between steps stays in the process while the trainer lives and is handed back on
    exit (:mod:`fedlpt.allocator`).

    Args:
        model: trained in place.
        recipe: the low-precision formats; ``LowPrecision()`` is plain FP32 training.
        optimizer, lr, momentum: the local optimizer (see :func:`make_optimizer`).
        proximal_mu: FedProx's ``mu``; the current parameters are its anchor.
        generator: the stream of stochastic rounding (on the model's device).
        optimizer_state: a previous state dict of the same optimizer to resume from (only
            its per-parameter ``"state"`` is used; hyperparameters come from this call).
        engine: ``"auto"``, ``"integer"`` or ``"emulated"``
            (:func:`fedlpt.quant.training.select_engine`); ``engine`` says which one runs.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: LowPrecision,
        *,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        proximal_mu: float = 0.0,
        generator: torch.Generator | None = None,
        optimizer_state: Mapping[str, Any] | None = None,
        engine: str = "auto",
    ) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {proximal_mu}")
        self.model = model
        self.device = _device_of(model)
        if self.device.type == "cpu":
            # Without it, glibc hands the step's activations back to the kernel every
            # step and page-faults them in again: a sixth of an 8-bit step's time.
            allocator.hold_freed_memory()
        self.proximal_mu = proximal_mu
        self.anchor = (
            {k: v.detach().clone() for k, v in model.named_parameters()} if proximal_mu > 0 else {}
        )
        inner = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum)
        if optimizer_state is not None:
            inner.load_state_dict({**inner.state_dict(), "state": optimizer_state["state"]})
        self.optimizer = LowPrecisionOptimizer(inner, recipe, generator)
        self.criterion = nn.CrossEntropyLoss()
        prepare(model, recipe, generator, engine=engine)
        self.engine: str = model.fedlpt_engine
        model.train()

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Forward pass and loss (with FedProx's term when ``proximal_mu > 0``)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        loss = self.criterion(self.model(images), labels)
        if self.proximal_mu > 0:
            loss = loss + proximal_term(self.model, self.anchor, self.proximal_mu)
        return loss

    def step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One training step; returns the (detached) loss."""
        self.optimizer.zero_grad()
        loss = self.loss(images, labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def close(self) -> dict[str, Any]:
        """Remove the quantizers and hand freed memory back; return the optimizer's state
        dict (to resume next round)."""
        unprepare(self.model)
        if self.device.type == "cpu":
            allocator.release_freed_memory()
        return self.optimizer.state_dict()

    def __enter__(self) -> LocalTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    recipe: LowPrecision,
    epochs: int = 1,
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
    optimizer_state: Mapping[str, Any] | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
    engine: str = "auto",
) -> tuple[TrainResult, dict[str, Any]]:
    """Train ``model`` in place for ``epochs`` over ``loader`` with the low-precision ``recipe``.

    Training runs on the model's device. ``seed`` seeds stochastic rounding.
    ``optimizer_state`` (from a previous call) resumes the optimizer, as the paper keeps
    each client's Adam moments across rounds. Training that lasts longer than
    ``progress_every_s`` logs a progress line that often (epoch, step, pace, time left).
    ``engine`` picks the low-precision engine (see :class:`LocalTrainer`).
    Returns the result and the optimizer's new state dict.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    trainer = LocalTrainer(
        model,
        recipe,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        proximal_mu=proximal_mu,
        generator=torch.Generator(_device_of(model)).manual_seed(seed),
        optimizer_state=optimizer_state,
        engine=engine,
    )
    # The loss sum stays on the device: reading it every step would synchronize a GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    examples, steps = 0, 0
    total_steps = epochs * len(loader)
    first_done = last_report = time.monotonic()
    with trainer:
        for epoch in range(epochs):
            for images, labels in loader:
                loss = trainer.step(images, labels)
                loss_sum += loss * labels.shape[0]
                examples += labels.shape[0]
                steps += 1
                now = time.monotonic()
                if steps == 1:
                    # The first step compiles the rounding kernels: pace is measured after it.
                    first_done = now
                if now - last_report >= progress_every_s:
                    last_report = now
                    _log_progress(epoch, epochs, steps, total_steps, now - first_done)
    mean_loss = loss_sum.item() / examples if examples else float("nan")
    if examples and not math.isfinite(mean_loss):
        # The quantizers do not check every tensor (that would stall a GPU): a NaN or an
        # Inf anywhere in the step shows here.
        raise ValueError(f"local training diverged: the mean loss is {mean_loss}")
    return TrainResult(mean_loss, examples, steps, trainer.engine), trainer.optimizer.state_dict()


def _log_progress(epoch: int, epochs: int, steps: int, total_steps: int, elapsed: float) -> None:
    """One line: where training is and, once a step has been timed, its pace and time left."""
    where = f"fedlpt local training: epoch {epoch + 1}/{epochs}, step {steps}/{total_steps}"
    if steps < 2 or elapsed <= 0:
        logger.info("%s (the first step may compile the rounding kernels; pace follows)", where)
        return
    pace = (steps - 1) / elapsed
    logger.info("%s, %.1f steps/s, about %.0f s left", where, pace, (total_steps - steps) / pace)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float, int]:
    """Mean cross-entropy, accuracy in [0, 1] and number of examples of ``model`` on ``loader``."""
    model.eval()
    device = _device_of(model)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # Sums stay on the device until the end: one synchronization, not one per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    examples = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += criterion(logits, labels)
        correct += (logits.argmax(dim=1) == labels).sum()
        examples += labels.shape[0]
    if not examples:
        return float("nan"), float("nan"), 0
    return loss_sum.item() / examples, correct.item() / examples, examples


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def make_recipe(
    bits: Mapping[str, int],
    *,
    block: BlockKind,
    rounding: str,
    quantize_optimizer_state: bool = False,
) -> LowPrecision:
    """The paper's recipe from one word length per role: :meth:`LowPrecision.from_roles`."""
    return LowPrecision.from_roles(
        bits, block=block, rounding=rounding, quantize_optimizer_state=quantize_optimizer_state
    )


def build_model(dataset: str, model: str) -> nn.Module:
    """A fresh ``model`` (e.g. ``"convnet"``) shaped for ``dataset``'s images and classes."""
    info = dataset_info(dataset)
    return models.build_model(model, info.in_channels, info.image_size, info.num_classes)


def resolve_device(name: str) -> torch.device:
    """The torch device a run-config ``device`` names; ``"auto"``: CUDA when available.

    Raises:
        ValueError: the device is not present on this machine (names it).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} was asked for, but there are {torch.cuda.device_count()} CUDA devices"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for, but MPS is not available here")
    return device
