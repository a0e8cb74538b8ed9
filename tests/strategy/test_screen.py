"""ReplyScreen on hand-made replies: what passes, what is dropped and why, bounded weights."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from fedlpt import protocol
from fedlpt.strategy.screen import ReplyScreen, RunFailedError
from tests.strategy.replies import error_reply, metrics, reply, small_model, train_message


def honest(node_id: int, seed: int, num_examples: int = 10) -> Message:
    return reply(node_id, ArrayRecord(small_model(seed)), metrics(num_examples))


def aggregate(screen: ReplyScreen, replies: list[Message], server_round: int = 1):
    arrays, _ = screen.aggregate_train(server_round, replies)
    return None if arrays is None else arrays.to_torch_state_dict()


def with_metrics(**values) -> Message:
    record = metrics()
    for key, value in values.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    return reply(9, ArrayRecord(small_model(9)), record)


def with_tensor(name: str, value: torch.Tensor) -> Message:
    model = small_model(9)
    model[name] = value
    return reply(9, ArrayRecord(model))


def with_content(**records) -> Message:
    content = RecordDict(
        {protocol.ARRAY_RECORD: ArrayRecord(small_model(9)), protocol.METRIC_RECORD: metrics()}
    )
    for key, record in records.items():
        if record is None:
            del content[key]
        else:
            content[key] = record
    return Message(content, reply_to=train_message(9))


HOSTILE = {
    "two ArrayRecords": (
        lambda: with_content(extra=ArrayRecord(small_model(1))),
        "exactly ArrayRecord",
    ),
    "renamed ArrayRecord": (
        lambda: with_content(arrays=None, weights=ArrayRecord(small_model(1))),
        "exactly ArrayRecord",
    ),
    "a ConfigRecord": (lambda: with_content(config=ConfigRecord({"a": 1})), "exactly ArrayRecord"),
    "no metrics": (lambda: with_content(metrics=None), "exactly ArrayRecord"),
    "two MetricRecords": (lambda: with_content(more=MetricRecord({"x": 1})), "exactly ArrayRecord"),
    "a missing metric": (lambda: with_metrics(**{"train-loss": None}), "metrics are"),
    "an extra metric": (lambda: with_metrics(extra=1.0), "metrics are"),
    "a list metric": (lambda: with_metrics(**{"train-loss": [1.0, 2.0]}), "'train-loss' is list"),
    "a NaN metric": (lambda: with_metrics(**{"train-loss": float("nan")}), "'train-loss' is nan"),
    "an Inf metric": (lambda: with_metrics(**{"bits": float("inf")}), "'bits' is inf"),
    "num-examples 0": (lambda: with_metrics(**{"num-examples": 0}), "positive int, got 0"),
    "num-examples < 0": (lambda: with_metrics(**{"num-examples": -5}), "positive int, got -5"),
    "num-examples float": (lambda: with_metrics(**{"num-examples": 2.5}), "positive int, got 2.5"),
    "num-examples list": (lambda: with_metrics(**{"num-examples": [3, 4]}), "is list"),
    "a NaN weight": (lambda: with_tensor("w", torch.full((4, 3), float("nan"))), "'w' holds NaN"),
    "an Inf bias": (
        lambda: with_tensor("b", torch.tensor([1.0, float("inf"), 0, 0])),
        "'b' holds NaN",
    ),
    "a huge weight": (lambda: with_tensor("w", torch.full((4, 3), 1e6)), "beyond"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_reply_is_dropped_with_a_reason_and_honest_ones_aggregate(case: str) -> None:
    make_hostile, reason = HOSTILE[case]
    screen = ReplyScreen(FedAvg())
    result = aggregate(screen, [honest(1, 1), make_hostile(), honest(2, 2)])
    expected = aggregate(ReplyScreen(FedAvg()), [honest(1, 1), honest(2, 2)])
    assert result is not None and all(torch.equal(result[k], expected[k]) for k in expected)
    (dropped,) = screen.own_dropped(1)
    assert dropped.node_id == 9 and dropped.by == "screen"
    assert reason in dropped.reason, dropped.reason


def test_a_huge_claim_moves_the_model_no_more_than_a_median_claim() -> None:
    liar = aggregate(
        ReplyScreen(FedAvg()), [honest(1, 1, 10), honest(2, 2, 12), honest(3, 3, 10**12)]
    )
    median = aggregate(
        ReplyScreen(FedAvg()), [honest(1, 1, 10), honest(2, 2, 12), honest(3, 3, 12)]
    )
    assert all(torch.equal(liar[k], median[k]) for k in median)


def test_claims_below_the_limit_keep_fedavgs_weights() -> None:
    screen = ReplyScreen(FedAvg(), max_weight_ratio=0)  # no clip
    result = aggregate(screen, [honest(1, 1, 10), honest(2, 2, 30)])
    one, two = small_model(1), small_model(2)
    assert torch.allclose(result["w"], 0.25 * one["w"] + 0.75 * two["w"])


def test_equal_weighting_is_the_papers_unweighted_mean() -> None:
    screen = ReplyScreen(FedAvg(), weighting="equal")
    result = aggregate(screen, [honest(1, 1, 10), honest(2, 2, 30)])
    one, two = small_model(1), small_model(2)
    assert torch.allclose(result["w"], 0.5 * one["w"] + 0.5 * two["w"])


def test_error_replies_are_logged_once_per_node_and_reason(caplog) -> None:
    screen = ReplyScreen(FedAvg())
    caplog.set_level(logging.WARNING, logger="flwr")
    for server_round in (1, 2, 3):
        aggregate(screen, [error_reply(4, "bits=1"), honest(1, 1), honest(2, 2)], server_round)
    assert sum("bits=1" in r.getMessage() for r in caplog.records) == 1
    assert sum(screen.node_errors[4].values()) == 3
    assert screen.own_dropped(3)[0].reason.endswith("bits=1")


def test_rounds_without_a_usable_reply_stop_the_run_naming_the_causes() -> None:
    screen = ReplyScreen(FedAvg(), max_failed_rounds=3)
    nan = with_metrics(**{"train-loss": float("nan")})
    assert aggregate(screen, [nan], 1) is None
    assert aggregate(screen, [honest(1, 1)], 2) is not None  # a success resets the streak
    assert aggregate(screen, [error_reply(4, "out of memory")], 3) is None
    assert aggregate(screen, [], 4) is None
    with pytest.raises(RunFailedError, match=r"3 consecutive rounds.*out of memory \(x1\)"):
        aggregate(screen, [nan], 5)


class Exploding(FedAvg):
    """An aggregator with a bug."""

    def aggregate_train(self, server_round, replies):
        raise ZeroDivisionError("bug")


class NonFinite(Strategy):
    """An aggregator that produces NaN."""

    def configure_train(self, *args):
        return []

    def configure_evaluate(self, *args):
        return []

    def aggregate_evaluate(self, *args):
        return None

    def summary(self) -> None:
        pass

    def aggregate_train(self, server_round, replies):
        return ArrayRecord({"w": torch.full((4, 3), float("nan"))}), MetricRecord()


@pytest.mark.parametrize("inner", [Exploding(), NonFinite()])
def test_a_failed_or_non_finite_aggregate_keeps_the_model(inner) -> None:
    assert aggregate(ReplyScreen(inner), [honest(1, 1), honest(2, 2)]) is None


def test_the_failure_streak_survives_a_checkpoint() -> None:
    screen = ReplyScreen(FedAvg(), max_failed_rounds=2)
    aggregate(screen, [error_reply(4, "x")], 1)
    restored = ReplyScreen(FedAvg(), max_failed_rounds=2)
    restored.load_state_dict(screen.state_dict())
    assert restored.node_errors == screen.node_errors
    with pytest.raises(RunFailedError):
        aggregate(restored, [error_reply(4, "x")], 2)
