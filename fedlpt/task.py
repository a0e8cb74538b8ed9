"""Local training and evaluation: what a client does with its data in one round."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .quant.training import LowPrecision, LowPrecisionOptimizer, prepare, unprepare

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`: mean loss over all steps, examples seen, steps taken."""

    loss: float
    num_examples: int
    steps: int


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
    total = torch.zeros(())
    for name, param in model.named_parameters():
        total = total + (param - global_params[name]).pow(2).sum()
    return 0.5 * mu * total


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
    optimizer_state: dict[str, Any] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train ``model`` in place for ``epochs`` over ``loader`` with the low-precision ``recipe``.

    The model is prepared with activation/error quantizers for the duration of the call
    and left plain afterwards. ``seed`` seeds stochastic rounding. ``optimizer_state``
    (from a previous call) resumes the optimizer, as the paper keeps each client's Adam
    moments across rounds (only its ``"state"`` entry is used). Returns the result and the
    optimizer's new state dict.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if proximal_mu < 0:
        raise ValueError(f"proximal-mu must be >= 0, got {proximal_mu}")
    generator = torch.Generator().manual_seed(seed)
    global_params = (
        {k: v.detach().clone() for k, v in model.named_parameters()} if proximal_mu > 0 else {}
    )
    inner = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum)
    if optimizer_state is not None:
        # Resume the per-parameter state; hyperparameters come from this call.
        inner.load_state_dict({**inner.state_dict(), "state": optimizer_state["state"]})
    opt = LowPrecisionOptimizer(inner, recipe, generator)
    prepare(model, recipe, generator)
    criterion = nn.CrossEntropyLoss()
    model.train()
    loss_sum, examples, steps = 0.0, 0, 0
    try:
        for _ in range(epochs):
            for images, labels in loader:
                opt.zero_grad()
                loss = criterion(model(images), labels)
                if proximal_mu > 0:
                    loss = loss + proximal_term(model, global_params, proximal_mu)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * labels.shape[0]
                examples += labels.shape[0]
                steps += 1
    finally:
        unprepare(model)
    mean_loss = loss_sum / examples if examples else float("nan")
    return TrainResult(mean_loss, examples, steps), inner.state_dict()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float, int]:
    """Mean cross-entropy, accuracy in [0, 1] and number of examples of ``model`` on ``loader``."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, examples = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images)
        loss_sum += criterion(logits, labels).item()
        correct += int((logits.argmax(dim=1) == labels).sum())
        examples += labels.shape[0]
    if not examples:
        return float("nan"), float("nan"), 0
    return loss_sum / examples, correct / examples, examples
