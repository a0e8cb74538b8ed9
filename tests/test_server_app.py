"""Whole federations through the ServerApp and in-process ClientApps: a few smoke tests."""

import logging
from logging import ERROR

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import log

from fedlpt import server_app
from fedlpt.client_app import app as client_app
from fedlpt.config import AppConfig, ConfigError, default_run_config
from fedlpt.inprocess import LocalGrid, simulate
from fedlpt.quant.wire import MANIFEST_KEY
from fedlpt.server_app import compose_strategy
from fedlpt.strategy.codec import CodecStrategy
from fedlpt.strategy.ema import ServerEMA
from fedlpt.strategy.registry import build_strategy
from fedlpt.strategy.traffic import TrafficMeter

FAST = {"model": "mlp", "num-server-rounds": 2, "batch-size": 64}


@pytest.mark.parametrize(
    "name",
    [
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "qfedavg",
    ],
)
def test_every_inner_strategy_trains_a_finite_float32_model(name: str) -> None:
    outcome = simulate({**FAST, "strategy.name": name}, 3)
    model = outcome.arrays.to_torch_state_dict()
    assert model and all(v.dtype == torch.float32 for v in model.values())
    assert all(torch.isfinite(v).all() for v in model.values())
    for server_round in (1, 2):
        traffic = outcome.strategy.traffic[server_round]
        assert traffic.replies == 3 and outcome.strategy.dropped(server_round) == []
        # FP32 down, 8-bit up; the small MLP's framing and metrics keep it below 4.
        assert 3.7 < traffic.bytes_down / traffic.bytes_up < 4.0
    assert [r["round"] for r in outcome.recorder.rows] == [0, 1, 2]


def test_a_malformed_reply_is_dropped_with_a_reason_and_the_round_goes_on() -> None:
    def corrupt(node_id: int, reply: Message) -> Message:
        if node_id == 101 and reply.content.array_records:
            del reply.content["arrays"][MANIFEST_KEY]
        return reply

    outcome = simulate(FAST, 3, reply_hook=corrupt)
    for server_round in (1, 2):
        (dropped,) = outcome.strategy.dropped(server_round)
        assert dropped.node_id == 101 and "tensors differ" in dropped.reason
        assert outcome.recorder.rows[server_round]["replies-dropped"] == 1
    assert outcome.recorder.dropped[2] == [str(outcome.strategy.dropped(2)[0])]


def test_the_ema_starts_at_its_round_and_runs_repeat_exactly() -> None:
    late = simulate({**FAST, "num-server-rounds": 3, "ema-start": 3}, 2)
    none = simulate({**FAST, "num-server-rounds": 3, "ema": False}, 2)
    again = simulate({**FAST, "num-server-rounds": 3, "ema": False}, 2)
    accuracy = [[r["accuracy"] for r in o.recorder.rows] for o in (late, none, again)]
    assert accuracy[0][:3] == accuracy[1][:3]  # identical until the EMA starts
    assert accuracy[1] == accuracy[2]  # node sampling and rounding are seeded


def test_the_chain_is_composed_from_the_run_config() -> None:
    cfg = AppConfig.from_run_config({**default_run_config(), "downlink-bits": 8})
    chain = compose_strategy(cfg, build_strategy("fedavg"))
    assert isinstance(chain, TrafficMeter)
    codec = chain.find(CodecStrategy)
    assert codec.upload.bits == 8 and codec.downlink.bits == 8
    assert chain.find(ServerEMA).decay == 0.9
    no_ema = AppConfig.from_run_config({**default_run_config(), "ema": False, "bits": 32})
    chain = compose_strategy(no_ema, build_strategy("fedavg"))
    assert chain.find(ServerEMA) is None and chain.find(CodecStrategy).upload is None


def test_a_node_that_never_answers_is_logged_and_the_round_goes_on(caplog) -> None:
    def silent(node_id: int, reply: Message) -> Message | None:
        return None if node_id == 102 else reply

    caplog.set_level(logging.WARNING, logger="flwr")
    outcome = simulate(FAST, 3, reply_hook=silent)
    assert [r["replies-missing"] for r in outcome.recorder.rows] == [0, 1, 1]
    assert any("node(s) [102]" in r.getMessage() for r in caplog.records)
    assert outcome.recorder.rows[-1]["replies"] == 2


def test_a_user_error_ends_the_run_with_one_line_and_no_traceback(caplog) -> None:
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**default_run_config(), "bits": 1},
    )
    caplog.set_level(logging.INFO, logger="flwr")
    with pytest.raises(ConfigError) as raised:
        server_app.main(LocalGrid(client_app, [], {}), context)
    # What Flower's ServerApp runner does with an exception from main:
    log(ERROR, "ServerApp raised an exception", exc_info=raised.value)
    messages = [(r.getMessage(), r.exc_info) for r in caplog.records if r.levelno == ERROR]
    assert messages[0] == ("fedlpt: run-config bits = 1 must be 2..16, or 32 for FP32", None)
    assert messages[1] == ("ServerApp raised an exception", None)
