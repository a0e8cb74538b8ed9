"""The codec wrapper: bit-packed uploads in, FP32 for the inner strategy, a quantized downlink.

:class:`CodecStrategy` announces each round's upload format in the train ConfigRecord
(see :mod:`fedlpt.protocol`), decodes every reply into FP32 before the inner strategy
sees it, and drops, with one logged reason, a reply that is not a well-formed encoding of
exactly the model that was sent. When a downlink format is given, the global model goes
out in that format after the inner strategy has configured the round in FP32 (so FedAdam
and its kin keep the exact model as their reference).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from ..protocol import write_upload_format
from ..quant import BFP
from ..quant.wire import PayloadError, encode_arrays, is_encoded, read_manifest, to_state_dict
from .base import DroppedReply, StrategyWrapper


class CodecStrategy(StrategyWrapper):
    """Encode the downlink, announce the upload format, decode replies for ``inner``.

    Args:
        inner: the strategy that samples, configures and aggregates in FP32.
        upload: the format clients upload in (``None``: FP32). A node may lower its bits.
        downlink: when set, the global model is sent in this format.
    """

    def __init__(self, inner: Strategy, *, upload: BFP | None, downlink: BFP | None = None) -> None:
        super().__init__(inner)
        self.upload = upload
        self.downlink = downlink
        self.sent: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._dropped: dict[int, list[DroppedReply]] = {}
        self.bits: dict[int, dict[int, int]] = {}  # round -> node -> bits it uploaded in

    def summary(self) -> None:
        """Log the formats, then the inner chain."""
        up = "FP32" if self.upload is None else str(self.upload)
        down = "FP32" if self.downlink is None else str(self.downlink)
        log(INFO, "\t├── CodecStrategy: upload %s, downlink %s", up, down)
        self.inner.summary()

    def own_dropped(self, server_round: int) -> list[DroppedReply]:
        """Replies that did not decode into the model sent in ``server_round``."""
        return self._dropped.get(server_round, [])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Announce the upload format; the inner chain configures; send the downlink."""
        write_upload_format(config, self.upload)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        self.sent = {name: (t.dtype, tuple(t.shape)) for name, t in _tensors(arrays).items()}
        return self._send(server_round, messages, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner chain's evaluate messages, with the downlink encoded."""
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._send(server_round, messages, arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply (dropping those that fail), aggregate with inner, keep dtypes.

        The aggregate comes back in the model's own dtypes (FedAdam and its kin compute in
        float64).
        """
        decoded = []
        for reply in replies:
            if reply.has_error():
                decoded.append(reply)  # the inner strategy logs error replies
                continue
            try:
                bits = self._bits(reply)
                reply.content[self.arrayrecord_key] = ArrayRecord(self._decode(reply))
            except PayloadError as err:
                self._drop(server_round, reply, str(err))
                continue
            self.bits.setdefault(server_round, {})[reply.metadata.src_node_id] = bits
            decoded.append(reply)
        arrays, metrics = self.inner.aggregate_train(server_round, decoded)
        if arrays is not None:
            arrays = ArrayRecord(
                {
                    name: tensor.to(self.sent[name][0]) if name in self.sent else tensor
                    for name, tensor in _tensors(arrays).items()
                }
            )
        return arrays, metrics

    def node_bits(self, server_round: int) -> dict[int, int]:
        """The word length each node's accepted upload of ``server_round`` used (32: FP32)."""
        return dict(self.bits.get(server_round, {}))

    def _bits(self, reply: Message) -> int:
        """The widest word length a reply's manifest declares; 32 for a plain FP32 record."""
        record = reply.content.array_records.get(self.arrayrecord_key)
        if record is None or not is_encoded(record):
            return 32
        entries = read_manifest(record, max_tensors=len(self.sent))
        return max((int(e["bits"]) for e in entries if "bits" in e), default=32)

    def state_dict(self) -> dict[str, Any]:
        """Bits per node and round, with the inner chain's state."""
        return {"bits": self.bits, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bits per node and round and the inner chain's state."""
        self.bits = {int(r): {int(n): b for n, b in v.items()} for r, v in state["bits"].items()}
        super().load_state_dict(state)

    def _decode(self, reply: Message) -> dict[str, Tensor]:
        """The reply's model as tensors, checked against the model that was sent.

        The check runs on what the reply declares (its manifest, or its Arrays' dtypes and
        shapes) before anything is decoded, so a reply costs at most what a legitimate
        upload of this model costs.
        """
        key = self.arrayrecord_key
        if key not in reply.content.array_records:
            raise PayloadError(f"reply has no ArrayRecord {key!r}")
        record = reply.content[key]
        if is_encoded(record):
            declared = {
                str(e["name"]): (str(e["dtype"]), tuple(e["shape"]))
                for e in read_manifest(record, max_tensors=len(self.sent))
            }
        else:
            declared = {name: (array.dtype, tuple(array.shape)) for name, array in record.items()}
        self._check_declared(declared)
        return to_state_dict(record)

    def _check_declared(self, declared: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        if set(declared) != set(self.sent):
            missing, extra = (
                sorted(set(self.sent) - set(declared)),
                sorted(set(declared) - set(self.sent)),
            )
            raise PayloadError(
                f"reply's tensors differ from the model's: missing {missing}, extra {extra}"
            )
        for name, (dtype_name, shape) in declared.items():
            dtype, sent_shape = self.sent[name]
            if dtype_name != _dtype_name(dtype) or shape != sent_shape:
                raise PayloadError(
                    f"tensor {name!r} is {dtype_name} {shape}, "
                    f"the model's is {_dtype_name(dtype)} {sent_shape}"
                )

    def _drop(self, server_round: int, reply: Message, reason: str) -> None:
        dropped = DroppedReply(server_round, reply.metadata.src_node_id, reason, by="codec")
        self._dropped.setdefault(server_round, []).append(dropped)
        log(WARNING, "Dropping reply from %s", dropped)

    def _send(
        self, server_round: int, messages: Iterable[Message], arrays: ArrayRecord
    ) -> list[Message]:
        """Encode each message's model in the downlink format, once per distinct record.

        What :class:`~fedlpt.strategy.delta.DeltaSync` sends (a node's full model or its
        difference) is already on this format's grid, so it encodes exactly: the node
        decodes the very copy the server keeps for it.
        """
        messages = list(messages)
        if self.downlink is None:
            return messages
        generator = torch.Generator().manual_seed(server_round)
        encoded: dict[int, ArrayRecord] = {}
        done: set[int] = set()
        for message in messages:
            content = message.content
            if id(content) in done or self.arrayrecord_key not in content.array_records:
                continue
            done.add(id(content))
            record = content[self.arrayrecord_key]
            if id(record) not in encoded:
                encoded[id(record)] = encode_arrays(_tensors(record), self.downlink, generator)
            content[self.arrayrecord_key] = encoded[id(record)]
        return messages


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the name the manifest and NumPy both use."""
    return str(dtype).removeprefix("torch.")


def _tensors(arrays: ArrayRecord) -> dict[str, Tensor]:
    """The global model's tensors (the server's own record: trusted)."""
    return dict(arrays.to_torch_state_dict())
