"""ServerEMA on hand-made replies: the paper's formula, its start round, the warm-up, state."""

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedlpt.quant.wire import to_state_dict
from fedlpt.strategy.ema import ServerEMA
from tests.strategy.replies import reply


def aggregate(ema: ServerEMA, server_round: int, model: dict[str, torch.Tensor]):
    arrays, _ = ema.aggregate_train(server_round, [reply(1, ArrayRecord(model))])
    return to_state_dict(arrays)


def test_the_average_follows_the_paper_formula_from_the_start_round() -> None:
    ema = ServerEMA(FedAvg(), decay=0.9, start=2)
    first = {"w": torch.tensor([1.0, 2.0])}
    second = {"w": torch.tensor([3.0, 4.0])}
    third = {"w": torch.tensor([5.0, 6.0])}
    assert torch.equal(aggregate(ema, 1, first)["w"], first["w"])  # before start: as is
    assert ema.average is None
    assert torch.equal(aggregate(ema, 2, second)["w"], second["w"])  # the start: a copy
    out = aggregate(ema, 3, third)
    assert torch.allclose(out["w"], 0.9 * second["w"] + 0.1 * third["w"])


def test_non_float_tensors_follow_the_aggregate() -> None:
    ema = ServerEMA(FedAvg(), decay=0.9)
    ema.update({"w": torch.tensor([1.0]), "steps": torch.tensor(1)})
    out = ema.update({"w": torch.tensor([2.0]), "steps": torch.tensor(2)})
    assert out["steps"].item() == 2 and out["steps"].dtype == torch.int64


def test_the_warm_up_ramps_the_decay_linearly() -> None:
    ema = ServerEMA(FedAvg(), decay=0.9, warmup=3)
    assert [ema.decay_at(n) for n in range(5)] == pytest.approx([0.0, 0.3, 0.6, 0.9, 0.9])
    fixed = ServerEMA(FedAvg(), decay=0.9)
    assert [fixed.decay_at(n) for n in range(3)] == [0.0, 0.9, 0.9]


def test_the_average_survives_a_checkpoint() -> None:
    ema = ServerEMA(FedAvg(), decay=0.5)
    aggregate(ema, 1, {"w": torch.tensor([2.0])})
    restored = ServerEMA(FedAvg(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    for strategy in (ema, restored):
        assert torch.equal(
            aggregate(strategy, 2, {"w": torch.tensor([4.0])})["w"], torch.tensor([3.0])
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, "ema-decay"),
        ({"decay": 0.9, "start": 0}, "ema-start"),
        ({"decay": 0.9, "warmup": -1}, "ema-warmup"),
    ],
)
def test_bad_settings_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ServerEMA(FedAvg(), **kwargs)
