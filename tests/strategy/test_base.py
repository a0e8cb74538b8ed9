"""StrategyWrapper: pass-through, the chain's helpers, and checkpoints of Flower's own state."""

import io

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fedlpt.client_app import app as client_app
from fedlpt.inprocess import LocalGrid
from fedlpt.quant import BFP
from fedlpt.strategy.base import StrategyWrapper
from fedlpt.strategy.codec import CodecStrategy
from fedlpt.strategy.ema import ServerEMA
from fedlpt.strategy.traffic import TrafficMeter
from tests.strategy.replies import reply, small_model


def chain(inner) -> TrafficMeter:
    return TrafficMeter(CodecStrategy(ServerEMA(inner, decay=0.5), upload=None))


def test_the_chain_finds_its_wrappers_and_its_flower_strategy() -> None:
    inner = FedAvg()
    strategy = chain(inner)
    assert isinstance(strategy.find(ServerEMA), ServerEMA)
    assert strategy.find(TrafficMeter) is strategy
    assert strategy.innermost() is inner
    assert strategy.arrayrecord_key == "arrays"
    assert strategy.dropped(1) == []


def test_a_wrapper_needs_a_flower_strategy() -> None:
    with pytest.raises(TypeError, match="Flower Strategy"):
        StrategyWrapper(object())  # type: ignore[arg-type]


def two_node_grid() -> LocalGrid:
    """Flower's strategies wait for two nodes by default (min-available-nodes)."""
    return LocalGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], {})


def run_round(strategy, server_round: int, model, replies) -> None:
    grid = two_node_grid()
    list(strategy.configure_train(server_round, ArrayRecord(model), ConfigRecord(), grid))
    strategy.aggregate_train(server_round, replies)


@pytest.mark.parametrize("inner_type", [FedAdam, FedAvgM])
def test_a_checkpoint_restores_the_inner_strategys_moments(inner_type) -> None:
    """Two rounds straight equal one round, a checkpoint through torch.save, one round."""
    model, one, two = small_model(0), small_model(1), small_model(2)

    def fresh():
        return chain(inner_type(fraction_evaluate=0.0))

    straight = fresh()
    run_round(straight, 1, model, [reply(1, ArrayRecord(one))])
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    run_round(straight, 2, model, [reply(1, ArrayRecord(two))])

    resumed = fresh()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run_round(resumed, 2, model, [reply(1, ArrayRecord(two))])
    a, b = straight.innermost(), resumed.innermost()
    for name in ("m_t", "v_t", "momentum_vector"):
        mine, theirs = getattr(a, name, None), getattr(b, name, None)
        if mine is None:
            continue
        values = mine.values() if isinstance(mine, dict) else mine
        others = theirs.values() if isinstance(theirs, dict) else theirs
        assert all(np.array_equal(x, y) for x, y in zip(values, others, strict=True))
    ema_a, ema_b = straight.find(ServerEMA), resumed.find(ServerEMA)
    assert all(torch.equal(ema_a.average[k], ema_b.average[k]) for k in model)


def test_unknown_flower_state_in_a_checkpoint_is_refused() -> None:
    strategy = chain(FedAvg())
    state = strategy.state_dict()
    state["inner"]["inner"]["inner"] = {"secret": {"kind": "list", "values": []}}
    with pytest.raises(ValueError, match="unknown strategy state 'secret'"):
        chain(FedAvg()).load_state_dict(state)


def test_the_train_config_carries_only_what_the_client_reads() -> None:
    strategy = chain(FedAvg())
    strategy.find(CodecStrategy).upload = BFP(8)
    config = ConfigRecord()
    run_round_config = list(
        strategy.configure_train(1, ArrayRecord(small_model()), config, two_node_grid())
    )
    assert len(run_round_config) == 2
    assert sorted(config) == [
        "fedlpt.upload.bits",
        "fedlpt.upload.block",
        "fedlpt.upload.rounding",
        "server-round",
    ]
