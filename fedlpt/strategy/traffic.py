"""The traffic meter: bytes that cross the wire each round, as Flower serializes them.

:class:`TrafficMeter` is the outermost wrapper, so it counts the messages exactly as they
leave (after the codec encoded the downlink) and the replies exactly as they arrive
(before anything is decoded or dropped). :func:`serialized_size` is the one measure of a
message's bytes that fedlpt uses, in the server and in the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from .base import StrategyWrapper


def serialized_size(content: ArrayRecord | RecordDict) -> int:
    """Bytes Flower transfers for a message's content (an ArrayRecord as ``{"arrays": ...}``).

    Sums the deflated objects that Flower pushes (record dict, records, arrays, array
    chunks; identical chunks once) plus their 64-character object ids.
    """
    if isinstance(content, ArrayRecord):
        content = RecordDict({"arrays": content})
    objects = get_all_nested_objects(content)
    return sum(len(obj.deflate()) + len(object_id) for object_id, obj in objects.items())


@dataclass
class RoundTraffic:
    """Bytes Flower moved in one round, as serialized for transport."""

    server_round: int
    bytes_down: int = 0  # train messages to the nodes
    bytes_up: int = 0  # train replies from the nodes (all received, dropped ones too)
    bytes_down_eval: int = 0  # evaluate messages to the nodes
    bytes_up_eval: int = 0  # evaluate replies (metrics only)
    replies: int = 0  # train replies received, error replies included
    up_by_node: dict[int, int] = field(default_factory=dict)  # train reply bytes per node

    @property
    def total(self) -> int:
        """Every byte of the round, both directions, train and evaluate."""
        return self.bytes_down + self.bytes_up + self.bytes_down_eval + self.bytes_up_eval


class TrafficMeter(StrategyWrapper):
    """Count every message's bytes per round; wrap outermost. ``traffic[round]`` holds them."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.traffic: dict[int, RoundTraffic] = {}

    def _round(self, server_round: int) -> RoundTraffic:
        return self.traffic.setdefault(server_round, RoundTraffic(server_round))

    def summary(self) -> None:
        """Log that traffic is metered, then the inner chain."""
        log(INFO, "\t├── TrafficMeter: bytes up and down per round, as serialized")
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner chain's train messages, counted."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._round(server_round).bytes_down += _sizes(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner chain's evaluate messages, counted."""
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._round(server_round).bytes_down_eval += _sizes(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the replies as they arrived, then let the inner chain aggregate them."""
        replies = list(replies)
        traffic = self._round(server_round)
        traffic.replies += len(replies)
        for reply in replies:
            size = _sizes([reply])
            traffic.bytes_up += size
            node = reply.metadata.src_node_id
            traffic.up_by_node[node] = traffic.up_by_node.get(node, 0) + size
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Count the evaluate replies, then let the inner chain aggregate them."""
        replies = list(replies)
        self._round(server_round).bytes_up_eval += _sizes(replies)
        return self.inner.aggregate_evaluate(server_round, replies)

    def state_dict(self) -> dict[str, Any]:
        """The traffic so far, with the inner chain's state."""
        return {
            "traffic": [asdict(t) for t in self.traffic.values()],
            **super().state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the traffic so far and the inner chain's state."""
        self.traffic = {t["server_round"]: RoundTraffic(**t) for t in state["traffic"]}
        super().load_state_dict(state)


def _sizes(messages: list[Message]) -> int:
    """Total serialized size of the messages' contents (error replies carry none).

    Strategies send one shared RecordDict to every node: it is measured once.
    """
    measured: dict[int, int] = {}
    total = 0
    for message in messages:
        if not message.has_content():
            continue
        content = message.content
        if id(content) not in measured:
            measured[id(content)] = serialized_size(content)
        total += measured[id(content)]
    return total
