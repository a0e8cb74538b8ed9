"""The reply screen: only well-formed, finite, plausibly weighted replies reach aggregation.

:class:`ReplyScreen` stands between the codec (which has decoded every reply into the
model that was sent) and the aggregating strategy. A reply passes only if it carries
exactly one ArrayRecord and one MetricRecord, the metrics are exactly
:data:`fedlpt.protocol.TRAIN_METRICS` with finite scalar values, ``num-examples`` is a
positive int, and every floating tensor is finite and within ``max_abs``; anything else
is dropped with one logged reason. Claims of ``num-examples`` above ``max_weight_ratio``
times the round's median are clipped (or every weight is 1 with ``weighting="equal"``, the
paper's unweighted mean), so no reply can dominate by claiming a huge dataset. The
aggregate itself is checked too: a non-finite model is refused and the previous one kept.

Nothing a reply contains can raise out of :meth:`ReplyScreen.aggregate_train`; if every
reply of ``max_failed_rounds`` consecutive rounds fails, :class:`RunFailedError` stops the
run naming the causes.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from .. import protocol
from .base import DroppedReply, StrategyWrapper
from .registry import WEIGHTINGS


class RunFailedError(RuntimeError):
    """Every reply failed for too many consecutive rounds; the message names the causes."""


class ReplyScreen(StrategyWrapper):
    """Check every decoded reply, bound its weight, and check the aggregate.

    Args:
        inner: the strategy that aggregates the replies that pass.
        max_abs: largest magnitude a weight may have.
        weighting: ``"examples"`` (FedAvg's weights, clipped) or ``"equal"``.
        max_weight_ratio: with ``"examples"``, claims above this multiple of the round's
            median claim count as that multiple; 0 disables the clip.
        max_failed_rounds: stop the run after this many consecutive rounds in which no
            reply passed; 0 never stops.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        max_abs: float = 1e4,
        weighting: str = "examples",
        max_weight_ratio: float = 1.0,
        max_failed_rounds: int = 5,
    ) -> None:
        super().__init__(inner)
        if not (math.isfinite(max_abs) and max_abs > 0):
            raise ValueError(f"max_abs must be a finite number > 0, got {max_abs}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not (math.isfinite(max_weight_ratio) and max_weight_ratio >= 0):
            raise ValueError(f"max_weight_ratio must be >= 0, got {max_weight_ratio}")
        if max_failed_rounds < 0:
            raise ValueError(f"max_failed_rounds must be >= 0, got {max_failed_rounds}")
        self.max_abs = max_abs
        self.weighting = weighting
        self.max_weight_ratio = max_weight_ratio
        self.max_failed_rounds = max_failed_rounds
        self.failed_rounds: list[list[str]] = []  # causes of the current run of failures
        self.node_errors: dict[int, Counter[str]] = {}  # error replies per node and reason
        self.clipped: set[int] = set()  # nodes whose claims were clipped (logged once)
        self._dropped: dict[int, list[DroppedReply]] = {}

    def summary(self) -> None:
        """Log the screen's settings, then the inner chain."""
        clip = (
            f"claims clipped at {self.max_weight_ratio} x the median"
            if self.weighting == "examples" and self.max_weight_ratio
            else f"weights: {self.weighting}"
        )
        log(INFO, "\t├── ReplyScreen: |w| <= %g, %s", self.max_abs, clip)
        self.inner.summary()

    def own_dropped(self, server_round: int) -> list[DroppedReply]:
        """Replies the screen left out of ``server_round`` (error replies included)."""
        return self._dropped.get(server_round, [])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies that pass; None (keep the model) if none or on a bad result."""
        passed = []
        for reply in replies:
            reason = self._error_of(reply) if reply.has_error() else self._checked(reply)
            if reason is None:
                passed.append(reply)
            else:
                self._drop(server_round, reply, reason)
        if not passed:
            self._count_failure(server_round)
            return None, None
        self.failed_rounds = []
        self._weigh(server_round, passed)
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, passed)
        except Exception as err:  # the replies passed the screen: a fault of the aggregator
            log(ERROR, "Round %s: aggregation failed (%r); keeping the model", server_round, err)
            return None, None
        if arrays is not None and not _finite(arrays):
            log(ERROR, "Round %s: the aggregate is not finite; keeping the model", server_round)
            return None, metrics
        return arrays, metrics

    def _checked(self, reply: Message) -> str | None:
        """:meth:`_fault`, and a reason for whatever else a hostile reply could raise."""
        try:
            return self._fault(reply)
        except Exception as err:  # a reply is hostile until checked: nothing may escape
            return f"reply could not be checked: {err!r}"

    def _fault(self, reply: Message) -> str | None:
        """Why ``reply`` may not be aggregated, or None if it may."""
        content = reply.content
        if (
            list(content.array_records) != [protocol.ARRAY_RECORD]
            or list(content.metric_records) != [protocol.METRIC_RECORD]
            or content.config_records
        ):
            return (
                f"a reply must carry exactly ArrayRecord {protocol.ARRAY_RECORD!r} and "
                f"MetricRecord {protocol.METRIC_RECORD!r}; got arrays "
                f"{sorted(content.array_records)}, metrics {sorted(content.metric_records)}, "
                f"configs {sorted(content.config_records)}"
            )
        metrics = content[protocol.METRIC_RECORD]
        if set(metrics) != set(protocol.TRAIN_METRICS):
            return f"metrics are {sorted(metrics)}, expected {sorted(protocol.TRAIN_METRICS)}"
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"metric {key!r} is {type(value).__name__}, not a number"
            if not math.isfinite(value):
                return f"metric {key!r} is {value}"
        examples = metrics[protocol.NUM_EXAMPLES]
        if not isinstance(examples, int) or examples < 1:
            return f"{protocol.NUM_EXAMPLES} must be a positive int, got {examples!r}"
        for name, array in content[protocol.ARRAY_RECORD].items():
            values = torch.from_numpy(array.numpy())
            if not values.is_floating_point():
                continue
            if not bool(torch.isfinite(values).all()):
                return f"tensor {name!r} holds NaN or Inf"
            if values.numel() and float(values.abs().max()) > self.max_abs:
                return f"tensor {name!r} holds values beyond +-{self.max_abs:g}"
        return None

    def _weigh(self, server_round: int, replies: list[Message]) -> None:
        """Set each reply's aggregation weight: 1 (equal), or its claim clipped at the median."""
        claims = [r.content[protocol.METRIC_RECORD][protocol.NUM_EXAMPLES] for r in replies]
        if self.weighting == "equal":
            limit = 1
        elif self.max_weight_ratio:
            limit = max(1, int(self.max_weight_ratio * statistics.median(claims)))
        else:
            return
        for reply, claim in zip(replies, claims, strict=True):
            weight = min(claim, limit)
            if self.weighting == "equal":
                weight = 1
            elif weight < claim and reply.metadata.src_node_id not in self.clipped:
                self.clipped.add(reply.metadata.src_node_id)  # said once per node
                log(
                    INFO,
                    "Round %s: node %s claims %s examples; counted as %s (%s x the median); "
                    "set max-weight-ratio to change this",
                    server_round,
                    reply.metadata.src_node_id,
                    claim,
                    weight,
                    self.max_weight_ratio,
                )
            reply.content[protocol.METRIC_RECORD][protocol.NUM_EXAMPLES] = weight

    def _error_of(self, reply: Message) -> str:
        """The reason of an error reply; logged once per node and reason."""
        node = reply.metadata.src_node_id
        reason = f"the node's ClientApp failed: {reply.error.reason}"
        seen = self.node_errors.setdefault(node, Counter())
        if not seen[reason]:
            log(WARNING, "Node %s: %s", node, reason)
        seen[reason] += 1
        return reason

    def _drop(self, server_round: int, reply: Message, reason: str) -> None:
        dropped = DroppedReply(server_round, reply.metadata.src_node_id, reason, by="screen")
        self._dropped.setdefault(server_round, []).append(dropped)
        if not reply.has_error():  # error replies were logged once per node already
            log(WARNING, "Dropping reply from %s", dropped)

    def _count_failure(self, server_round: int) -> None:
        dropped = self.dropped(server_round)  # the whole chain: codec drops too
        causes = sorted({d.reason for d in dropped}) or ["no node replied"]
        log(WARNING, "Round %s: no reply could be aggregated; the model is kept", server_round)
        self.failed_rounds.append(causes)
        if self.max_failed_rounds and len(self.failed_rounds) >= self.max_failed_rounds:
            counted = Counter(c for causes in self.failed_rounds for c in causes)
            listing = "; ".join(f"{cause} (x{n})" for cause, n in counted.most_common(5))
            raise RunFailedError(
                f"no reply could be aggregated in {len(self.failed_rounds)} consecutive rounds "
                f"(max-failed-rounds): {listing}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The failure streak and per-node errors, with the inner chain's state."""
        return {
            "failed_rounds": [list(c) for c in self.failed_rounds],
            "node_errors": {str(n): dict(c) for n, c in self.node_errors.items()},
            **super().state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the failure streak, per-node errors and the inner chain's state."""
        self.failed_rounds = [list(c) for c in state["failed_rounds"]]
        self.node_errors = {int(n): Counter(c) for n, c in state["node_errors"].items()}
        super().load_state_dict(state)


def _finite(arrays: ArrayRecord) -> bool:
    tensors = arrays.to_torch_state_dict().values()
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
