"""The common ground of fedlpt's strategy wrappers: pass everything through to ``inner``.

Each wrapper (codec, reply screen, server EMA, traffic meter) is a Flower ``Strategy``
that holds another one and changes one step of the round, the way Flower's differential
privacy wrappers do; :class:`StrategyWrapper` passes every other call through. Wrappers
also carry their state for checkpoints (``state_dict`` / ``load_state_dict``), down to the
inner Flower strategy's own (FedAdam's moments, FedAvgM's momentum).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

W = TypeVar("W", bound="StrategyWrapper")

# Attributes in which Flower's strategies keep state across rounds (FedOpt family: the
# model and the moments; FedAvgM: the momentum; QFedAvg: the model).
_FLOWER_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")


@dataclass(frozen=True)
class DroppedReply:
    """A reply left out of aggregation: which node, which round, why, and who said so."""

    server_round: int
    node_id: int
    reason: str
    by: str

    def __str__(self) -> str:
        return f"node {self.node_id}: {self.reason}"


class StrategyWrapper(Strategy):
    """A Flower strategy around ``inner``: every method passes through unless overridden."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__()
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a Flower Strategy, got {type(inner).__name__}")
        self.inner = inner

    @property
    def arrayrecord_key(self) -> str:
        """Key of the model's ArrayRecord in messages (the innermost strategy's)."""
        return getattr(self.inner, "arrayrecord_key", "arrays")

    def find(self, kind: type[W]) -> W | None:
        """The first wrapper of type ``kind`` in this chain (this one included), or None."""
        strategy: Strategy = self
        while isinstance(strategy, StrategyWrapper):
            if isinstance(strategy, kind):
                return strategy
            strategy = strategy.inner
        return None

    def innermost(self) -> Strategy:
        """The Flower strategy at the bottom of the chain."""
        strategy: Strategy = self
        while isinstance(strategy, StrategyWrapper):
            strategy = strategy.inner
        return strategy

    def dropped(self, server_round: int) -> list[DroppedReply]:
        """Replies every wrapper of the chain left out of ``server_round``, outermost first."""
        found: list[DroppedReply] = []
        strategy: Strategy = self
        while isinstance(strategy, StrategyWrapper):
            found.extend(strategy.own_dropped(server_round))
            strategy = strategy.inner
        return found

    def own_dropped(self, server_round: int) -> list[DroppedReply]:
        """Replies this wrapper itself left out of ``server_round`` (none by default)."""
        return []

    def summary(self) -> None:
        """Log the inner strategy's settings (wrappers log their own line first)."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's aggregate of evaluation metrics."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def state_dict(self) -> dict[str, Any]:
        """This chain's state for a checkpoint: tensors, numbers and strings only."""
        return {"inner": _inner_state(self.inner)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        _load_inner_state(self.inner, state["inner"])


def _inner_state(inner: Strategy) -> dict[str, Any]:
    if isinstance(inner, StrategyWrapper):
        return inner.state_dict()
    return {
        name: _to_tensors(getattr(inner, name))
        for name in _FLOWER_STATE
        if getattr(inner, name, None) is not None
    }


def _load_inner_state(inner: Strategy, state: dict[str, Any]) -> None:
    if isinstance(inner, StrategyWrapper):
        inner.load_state_dict(state)
        return
    for name, value in state.items():
        if name not in _FLOWER_STATE:
            raise ValueError(f"checkpoint holds unknown strategy state {name!r}")
        setattr(inner, name, _from_tensors(value))


def _to_tensors(value: Any) -> dict[str, Any]:
    """An ArrayRecord, or a dict or list of NumPy arrays, as torch tensors and its kind."""
    if isinstance(value, ArrayRecord):
        return {"kind": "array_record", "values": dict(value.to_torch_state_dict())}
    if isinstance(value, dict):
        values = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in value.items()}
        return {"kind": "dict", "values": values}
    if isinstance(value, list):
        return {"kind": "list", "values": [torch.from_numpy(np.array(v, copy=True)) for v in value]}
    raise TypeError(f"cannot checkpoint strategy state of type {type(value).__name__}")


def _from_tensors(saved: dict[str, Any]) -> Any:
    """Inverse of :func:`_to_tensors`."""
    kind, values = saved["kind"], saved["values"]
    if kind == "array_record":
        return ArrayRecord(values)
    if kind == "dict":
        return {k: v.numpy() for k, v in values.items()}
    return [v.numpy() for v in values]
