"""Hand-made train messages and replies, as Flower's own strategy tests build them."""

from __future__ import annotations

import itertools

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from fedlpt import protocol

_IDS = itertools.count(1)


def train_message(node_id: int, arrays: ArrayRecord | None = None) -> Message:
    """A train message to ``node_id``, as if pushed by a grid (it has a message id)."""
    content = RecordDict({protocol.CONFIG_RECORD: ConfigRecord({protocol.SERVER_ROUND: 1})})
    if arrays is not None:
        content[protocol.ARRAY_RECORD] = arrays
    message = Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = f"m{next(_IDS)}"
    return message


def metrics(num_examples: int = 10, bits: int = 8) -> MetricRecord:
    """The MetricRecord an honest ClientApp sends with its model."""
    return MetricRecord(
        {
            protocol.NUM_EXAMPLES: num_examples,
            protocol.TRAIN_LOSS: 0.5,
            protocol.BITS: bits,
            protocol.TRAIN_SECONDS: 1.0,
        }
    )


def reply(node_id: int, arrays: ArrayRecord, metric_record: MetricRecord | None = None) -> Message:
    """A train reply from ``node_id`` carrying ``arrays`` and the usual metrics."""
    content = RecordDict(
        {protocol.ARRAY_RECORD: arrays, protocol.METRIC_RECORD: metric_record or metrics()}
    )
    return Message(content, reply_to=train_message(node_id))


def error_reply(node_id: int, reason: str) -> Message:
    """The error reply a SuperNode sends when its ClientApp raised."""
    error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
    return Message(error, reply_to=train_message(node_id))


def small_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A two-tensor model: a 4x3 weight and a bias."""
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(4, generator=generator)}
