"""The server EMA wrapper: a moving average of the aggregated model becomes the next global model.

The paper's server keeps ``w_ema = d * w_ema + (1 - d) * w_agg`` (``d = 0.9``) from round
``ema_start`` on, starting as a copy of that round's aggregate, and broadcasts ``w_ema``.
Low-precision clients need it: it averages out the rounding noise that each round's
aggregate carries. With a fixed ``d`` from the first round the broadcast model moves a
tenth of the way per round, which stalls the start; ``warmup`` ramps the decay linearly
from 0 to ``d`` over that many updates instead (0 keeps the paper's fixed decay).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from .base import StrategyWrapper


class ServerEMA(StrategyWrapper):
    """Replace each aggregate of ``inner`` with the moving average of the aggregates.

    Args:
        inner: the strategy whose aggregates are averaged.
        decay: ``d`` in ``[0, 1)``.
        start: first round whose aggregate enters the average (earlier ones pass through).
        warmup: number of updates over which the decay ramps from 0 to ``decay``; update
            ``n`` (0 for the first) uses ``decay * min(1, n / warmup)``.
    """

    def __init__(self, inner: Strategy, *, decay: float, start: int = 1, warmup: int = 0) -> None:
        super().__init__(inner)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema-decay must be in [0, 1), got {decay}")
        if start < 1:
            raise ValueError(f"ema-start must be >= 1, got {start}")
        if warmup < 0:
            raise ValueError(f"ema-warmup must be >= 0, got {warmup}")
        self.decay, self.start, self.warmup = decay, start, warmup
        self.average: dict[str, Tensor] | None = None
        self.updates = 0

    def summary(self) -> None:
        """Log the schedule, then the inner chain."""
        ramp = f", warm-up {self.warmup} rounds" if self.warmup else ""
        log(INFO, "\t├── ServerEMA: decay %s from round %s%s", self.decay, self.start, ramp)
        self.inner.summary()

    def decay_at(self, update: int) -> float:
        """The decay used by update number ``update`` (0: the first, a copy)."""
        if update == 0:
            return 0.0
        if self.warmup:
            return self.decay * min(1.0, update / self.warmup)
        return self.decay

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner aggregate, folded into the average from round ``start`` on."""
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or server_round < self.start:
            return arrays, metrics
        return ArrayRecord(self.update(dict(arrays.to_torch_state_dict()))), metrics

    @torch.no_grad()
    def update(self, aggregated: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fold one aggregate into the average; returns a copy of the new average.

        Floating tensors are averaged; others (counters) follow the aggregate. A model
        whose tensors changed names restarts the average.
        """
        if self.average is None or self.average.keys() != aggregated.keys():
            self.updates = 0
        decay = self.decay_at(self.updates)
        if self.updates == 0:
            self.average = {k: v.clone() for k, v in aggregated.items()}
        else:
            assert self.average is not None
            for name, value in aggregated.items():
                average = self.average[name]
                if average.is_floating_point():
                    average.mul_(decay).add_(value.to(average.dtype), alpha=1.0 - decay)
                else:
                    average.copy_(value)
        self.updates += 1
        return {k: v.clone() for k, v in self.average.items()}

    def state_dict(self) -> dict[str, Any]:
        """The average and its update count, with the inner chain's state."""
        average = None if self.average is None else {k: v.clone() for k, v in self.average.items()}
        return {"average": average, "updates": self.updates, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average, its update count and the inner chain's state."""
        average = state["average"]
        self.average = None if average is None else {k: v.clone() for k, v in average.items()}
        self.updates = state["updates"]
        super().load_state_dict(state)
