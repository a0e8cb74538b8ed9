"""A Flower strategy wrapper: bit-packed uploads in, FP32 aggregation, server EMA, traffic.

``QuantizedStrategy(inner)`` wraps any ``flwr.serverapp.strategy.Strategy`` by
composition, the way Flower's differential-privacy wrappers do: the inner strategy samples
nodes, builds messages and aggregates exactly as it would in FP32; the wrapper tells the
clients which format to upload in, decodes their bit-packed replies before the inner
strategy sees them, optionally quantizes the downlink after the inner strategy has seen the
FP32 model, keeps an exponential moving average (EMA) of the global model, and counts the
bytes that cross the wire in each direction every round.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from .quant import BFP
from .quant.wire import PayloadError, encode_arrays, serialized_size, to_state_dict

# Inner strategies selectable by name (``strategy.name`` in the run config).
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategies.FedAvg,
    "fedprox": flwr_strategies.FedProx,
    "fedavgm": flwr_strategies.FedAvgM,
    "fedadam": flwr_strategies.FedAdam,
    "fedyogi": flwr_strategies.FedYogi,
    "fedadagrad": flwr_strategies.FedAdagrad,
    "fedmedian": flwr_strategies.FedMedian,
    "fedtrimmedavg": flwr_strategies.FedTrimmedAvg,
    "krum": flwr_strategies.Krum,
    "multikrum": flwr_strategies.MultiKrum,
    "bulyan": flwr_strategies.Bulyan,
    "qfedavg": flwr_strategies.QFedAvg,
}

# Keys the wrapper adds to every train ConfigRecord; the ClientApp reads them.
CONFIG_BITS = "fedlpt.bits"  # 32 means FP32 upload
CONFIG_BLOCK = "fedlpt.block"
CONFIG_ROUNDING = "fedlpt.rounding"


def build_strategy(name: str, params: Mapping[str, object] | None = None) -> Strategy:
    """Instantiate a Flower strategy by name with kebab- or snake-case keyword ``params``.

    Raises ValueError naming the valid strategies or the valid parameters.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[key]
    accepted = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    kwargs = {k.replace("-", "_"): v for k, v in (params or {}).items()}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"strategy {key!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}"
        )
    return cls(**kwargs)


@dataclass
class RoundTraffic:
    """Bytes Flower moved in one round, as serialized for transport."""

    server_round: int
    bytes_down: int = 0  # train messages to the nodes
    bytes_up: int = 0  # train replies from the nodes (all received, dropped ones too)
    bytes_down_eval: int = 0  # evaluate messages to the nodes
    bytes_up_eval: int = 0  # evaluate replies (metrics only)
    replies: int = 0
    dropped: list[str] = field(default_factory=list)  # reasons, one per dropped reply


class QuantizedStrategy(Strategy):
    """Wrap ``inner`` for low-precision clients with bit-packed uploads.

    Args:
        inner: any Flower strategy; it aggregates in FP32 as usual.
        upload: the format clients encode their weights in (``None``: FP32). Sent in the
            train config; a node may override the bits through its node config.
        downlink: when set, the global model is sent to the nodes in this format (after
            the inner strategy has seen it in FP32).
        ema_decay: server moving average ``w_ema = d * w_ema + (1 - d) * w_agg`` of the
            aggregated model, which becomes the next global model; ``None`` disables it.
        ema_start: first round whose aggregate enters the EMA (it starts as a copy).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        upload: BFP | None,
        downlink: BFP | None = None,
        ema_decay: float | None = 0.9,
        ema_start: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a Flower Strategy, got {type(inner).__name__}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema-decay must be in [0, 1), got {ema_decay}")
        if ema_start < 1:
            raise ValueError(f"ema-start must be >= 1, got {ema_start}")
        self.inner = inner
        self.upload = upload
        self.downlink = downlink
        self.ema_decay = ema_decay
        self.ema_start = ema_start
        self.ema: dict[str, Tensor] | None = None
        self.traffic: dict[int, RoundTraffic] = {}
        self._downlink_cache: tuple[ArrayRecord, ArrayRecord] | None = None

    @property
    def arrayrecord_key(self) -> str:
        """Key of the model's ArrayRecord in messages (the inner strategy's)."""
        return getattr(self.inner, "arrayrecord_key", "arrays")

    def summary(self) -> None:
        """Log the wrapper's settings, then the inner strategy's."""
        up = "FP32" if self.upload is None else str(self.upload)
        down = "FP32" if self.downlink is None else str(self.downlink)
        ema = (
            "off"
            if self.ema_decay is None
            else f"decay {self.ema_decay} from round {self.ema_start}"
        )
        log(INFO, "\t├── QuantizedStrategy: upload %s, downlink %s, server EMA %s", up, down, ema)
        self.inner.summary()

    def _round(self, server_round: int) -> RoundTraffic:
        return self.traffic.setdefault(server_round, RoundTraffic(server_round))

    def _add_quant_config(self, config: ConfigRecord) -> None:
        fmt = self.upload
        config[CONFIG_BITS] = 32 if fmt is None else fmt.bits
        if fmt is not None:
            config[CONFIG_BLOCK] = str(fmt.block)
            config[CONFIG_ROUNDING] = fmt.rounding

    def _downlink_record(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The global model as sent: encoded once per round and shared by all messages."""
        if self.downlink is None:
            return arrays
        if self._downlink_cache is None or self._downlink_cache[0] is not arrays:
            state = to_state_dict(arrays)
            generator = torch.Generator().manual_seed(server_round)
            self._downlink_cache = (arrays, encode_arrays(state, self.downlink, generator))
        return self._downlink_cache[1]

    def _send(
        self, server_round: int, messages: Iterable[Message], arrays: ArrayRecord, train: bool
    ) -> list[Message]:
        messages = list(messages)
        key = self.arrayrecord_key
        traffic = self._round(server_round)
        for message in messages:
            if key in message.content.array_records:
                message.content[key] = self._downlink_record(server_round, arrays)
            size = serialized_size(message.content)
            if train:
                traffic.bytes_down += size
            else:
                traffic.bytes_down_eval += size
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure the round in FP32, then set formats and bytes."""
        self._add_quant_config(config)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        return self._send(server_round, messages, arrays, train=True)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Like :meth:`configure_train`, for the evaluation messages."""
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._send(server_round, messages, arrays, train=False)

    def _decode_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        traffic = self._round(server_round)
        key = self.arrayrecord_key
        decoded = []
        for reply in replies:
            traffic.replies += 1
            if not reply.has_content():
                decoded.append(reply)  # an error reply: the inner strategy logs it
                continue
            traffic.bytes_up += serialized_size(reply.content)
            try:
                if key not in reply.content.array_records:
                    raise PayloadError(f"reply has no ArrayRecord {key!r}")
                state = to_state_dict(reply.content[key])
                reply.content[key] = ArrayRecord({k: _fp32(v) for k, v in state.items()})
            except PayloadError as err:
                reason = f"node {reply.metadata.src_node_id}: {err}"
                traffic.dropped.append(reason)
                log(WARNING, "Dropping reply from %s", reason)
                continue
            decoded.append(reply)
        return decoded

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode replies, aggregate them with the inner strategy in FP32, apply the EMA."""
        valid = self._decode_replies(server_round, replies)
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if arrays is None:
            return None, metrics
        aggregated = {k: _fp32(v) for k, v in to_state_dict(arrays).items()}
        if self.ema_decay is not None and server_round >= self.ema_start:
            aggregated = self._update_ema(aggregated)
        traffic = self._round(server_round)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["bytes-up"] = traffic.bytes_up
        metrics["bytes-down"] = traffic.bytes_down
        metrics["replies-dropped"] = len(traffic.dropped)
        return ArrayRecord(aggregated), metrics

    @torch.no_grad()
    def _update_ema(self, aggregated: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.ema is None or self.ema.keys() != aggregated.keys():
            self.ema = {k: v.clone() for k, v in aggregated.items()}
        else:
            decay = self.ema_decay
            for name, value in aggregated.items():
                average = self.ema[name]
                if average.is_floating_point():
                    average.mul_(decay).add_(value, alpha=1.0 - decay)
                else:
                    average.copy_(value)  # e.g. counters: follow the aggregate
        return {k: v.clone() for k, v in self.ema.items()}

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Count the evaluate replies' bytes, then let the inner strategy aggregate them."""
        replies = list(replies)
        traffic = self._round(server_round)
        traffic.bytes_up_eval += sum(serialized_size(r.content) for r in replies if r.has_content())
        return self.inner.aggregate_evaluate(server_round, replies)


def _fp32(tensor: Tensor) -> Tensor:
    """Float tensors as float32 (FedAdam & co. return float64); others unchanged."""
    return tensor.float() if tensor.is_floating_point() else tensor
