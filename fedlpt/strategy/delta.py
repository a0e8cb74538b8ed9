"""The delta wrapper: the model travels as differences, with error feedback on the downlink.

:class:`DeltaSync` does two related things, both about what a node already holds:

* **Delta uploads.** Clients send ``w_local - w_received`` (at few bits, with their own
  error feedback, see the ClientApp); the wrapper rebuilds ``w_received + delta`` before
  anything below it sees the reply, so every Flower strategy still aggregates weights.
* **Downlink with error feedback.** With a quantized downlink, each node is sent the
  rounded difference between the new global model and *its* copy, and the server keeps
  the copy as the node will have it, so the node's copy tracks the FP32 model within one
  rounding of a small difference instead of drifting by one rounding of the whole model
  per round. A node the server holds no copy for (new, or one whose last round failed or
  timed out) gets the full model in the downlink format, which becomes its copy: at 8
  bits a quarter of an FP32 model, and every copy starts where the rounding left it,
  which the differences that follow then correct.

A copy is committed when the node's reply arrives; a node that did not answer may or may
not have applied the message, so it is sent a full model next time.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from .. import protocol
from ..quant import BFP, quantize
from .base import StrategyWrapper

Model = dict[str, Tensor]


class DeltaSync(StrategyWrapper):
    """Rebuild delta uploads; send error-fed downlink differences to each node's copy.

    Args:
        inner: the strategy that sees weights (FP32) on both sides.
        delta_uploads: whether clients upload ``w_local - w_received``.
        downlink: the format of the downlink differences (None: the full FP32 model is
            sent to every node, and the server tracks no copies).
    """

    def __init__(self, inner: Strategy, *, delta_uploads: bool, downlink: BFP | None) -> None:
        super().__init__(inner)
        self.delta_uploads = delta_uploads
        self.downlink = downlink
        self.copies: dict[int, tuple[int, Model]] = {}  # node -> (round, its model copy)
        self._pending: dict[int, tuple[int, Model]] = {}
        self._sent: Model = {}
        self._full: ArrayRecord | None = None  # this round's full model, rounded once

    def summary(self) -> None:
        """Log what travels as differences, then the inner chain."""
        up = "deltas" if self.delta_uploads else "weights"
        down = f"{self.downlink} differences with error feedback" if self.downlink else "FP32"
        log(INFO, "\t├── DeltaSync: uploads as %s, downlink as %s", up, down)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Announce the upload kind; give each node its difference (or the full model)."""
        config[protocol.UPLOAD_KIND] = "delta" if self.delta_uploads else "weights"
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        self._pending = {}
        self._full = None
        if self.downlink is None:
            return messages
        generator = torch.Generator().manual_seed(server_round)
        for message in messages:
            node = message.metadata.dst_node_id
            base_round, record = self._downlink_for(node, server_round, generator)
            config_for_node = ConfigRecord(dict(message.content[protocol.CONFIG_RECORD]))
            config_for_node[protocol.DOWNLINK_BASE] = base_round
            message.content = RecordDict(
                {protocol.ARRAY_RECORD: record, protocol.CONFIG_RECORD: config_for_node}
            )
        return messages

    def _downlink_for(
        self, node: int, server_round: int, generator: torch.Generator
    ) -> tuple[int, ArrayRecord]:
        """``(base round, arrays)`` for ``node``; remembers the copy it will then hold."""
        assert self.downlink is not None
        if node not in self.copies:
            if self._full is None:  # one record for every new node: the codec encodes it once
                self._full = ArrayRecord(
                    {k: _rounded(v, self.downlink, generator) for k, v in self._sent.items()}
                )
            self._pending[node] = (server_round, self._full.to_torch_state_dict())
            return protocol.FULL_MODEL, self._full
        base_round, copy = self.copies[node]
        difference, new_copy = {}, {}
        for name, target in self._sent.items():
            if target.is_floating_point():
                step = quantize(target - copy[name], self.downlink, generator)
                difference[name], new_copy[name] = step, copy[name] + step
            else:  # counters travel as they are
                difference[name], new_copy[name] = target.clone(), target.clone()
        self._pending[node] = (server_round, new_copy)
        return base_round, ArrayRecord(difference)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Commit the copies of the nodes that answered; rebuild their weights from deltas."""
        replies = list(replies)
        answered = {r.metadata.src_node_id for r in replies if r.has_content()}
        for node, pending in self._pending.items():
            if node in answered:
                self.copies[node] = pending
            else:
                self.copies.pop(node, None)  # did it apply the message? send it all next time
        if self.delta_uploads:
            for reply in replies:
                if reply.has_content() and protocol.ARRAY_RECORD in reply.content.array_records:
                    base = self._base_of(reply.metadata.src_node_id)
                    delta = reply.content[protocol.ARRAY_RECORD].to_torch_state_dict()
                    reply.content[protocol.ARRAY_RECORD] = ArrayRecord(_rebuilt(base, delta))
        self._pending = {}
        return self.inner.aggregate_train(server_round, replies)

    def _base_of(self, node: int) -> Model:
        """The model ``node`` trained from this round."""
        if node in self.copies:
            return self.copies[node][1]
        return self._sent

    def state_dict(self) -> dict[str, Any]:
        """Each node's copy, with the inner chain's state."""
        copies = {str(n): {"round": r, "model": m} for n, (r, m) in self.copies.items()}
        return {"copies": copies, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore each node's copy and the inner chain's state."""
        self.copies = {int(n): (c["round"], c["model"]) for n, c in state["copies"].items()}
        super().load_state_dict(state)


def _rounded(tensor: Tensor, fmt: BFP, generator: torch.Generator) -> Tensor:
    """``tensor`` on the grid of ``fmt`` if floating; counters as they are."""
    return quantize(tensor, fmt, generator) if tensor.is_floating_point() else tensor.clone()


def _rebuilt(base: Model, delta: Model) -> Model:
    """``base + delta`` for floating tensors the base has; anything else as sent.

    The codec has checked that the reply has exactly the model's tensors, shapes and dtypes.
    """
    return {
        name: base[name] + value if value.is_floating_point() and name in base else value
        for name, value in delta.items()
    }
