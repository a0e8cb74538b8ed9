"""The property: nothing a reply contains can raise out of the strategy or poison the model.

Hypothesis builds rounds of replies in which any reply may be hostile (malformed records,
renamed or reshaped tensors, NaN, huge values, forged manifests, bad metrics, error
replies) and runs them through the whole chain the ServerApp composes, for every inner
strategy the issue names.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlpt import protocol
from fedlpt.client_app import app as client_app
from fedlpt.config import AppConfig, default_run_config
from fedlpt.inprocess import LocalGrid
from fedlpt.quant import BFP
from fedlpt.quant.wire import MANIFEST_KEY, encode_arrays
from fedlpt.server_app import compose_strategy
from fedlpt.strategy.registry import build_strategy
from tests.strategy.replies import error_reply, metrics, reply, small_model, train_message

INNER = ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"]
NODES = 4

finite = st.floats(-10, 10, allow_nan=False, width=32)
poison = st.sampled_from([float("nan"), float("nan"), float("inf"), -float("inf"), 1e30, 3e38])
metric_value = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.floats(-1, 1), max_size=3),
)


@st.composite
def model_like(draw) -> dict[str, torch.Tensor]:
    """The model's tensors, possibly renamed, reshaped, retyped or poisoned."""
    model = small_model(draw(st.integers(0, 3)))
    kind = draw(
        st.sampled_from(
            ["honest", "poison", "poison", "poison", "rename", "extra", "missing", "shape", "dtype"]
        )
    )
    if kind == "poison":
        name = draw(st.sampled_from(sorted(model)))
        flat = model[name].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(poison)
    elif kind == "rename":
        model["w2"] = model.pop("w")
    elif kind == "extra":
        model["x"] = torch.zeros(draw(st.integers(0, 3)))
    elif kind == "missing":
        del model["b"]
    elif kind == "shape":
        model["w"] = model["w"].T.contiguous()
    elif kind == "dtype":
        model["b"] = model["b"].to(draw(st.sampled_from([torch.float64, torch.int32])))
    return model


@st.composite
def arrays(draw) -> ArrayRecord:
    """An ArrayRecord: encoded, plain, or with a forged or garbage Array."""
    model = draw(model_like())
    form = draw(st.sampled_from(["bfp", "bfp", "plain", "plain", "forged", "garbage", "empty"]))
    if form == "plain":
        return ArrayRecord(model)
    if form == "empty":
        return ArrayRecord()
    # A tensor BFP cannot carry (NaN, Inf) travels raw, as a forging client would send it.
    raw = [k for k, t in model.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    record = encode_arrays(model, BFP(draw(st.sampled_from([2, 4, 8, 16]))), keep_exact=raw)
    if form == "forged":
        junk = draw(st.binary(max_size=64))
        record[MANIFEST_KEY] = Array(np.frombuffer(junk, dtype=np.uint8).copy())
    elif form == "garbage":
        record[draw(st.sampled_from(sorted(record)))] = Array(
            np.frombuffer(draw(st.binary(min_size=1, max_size=64)), dtype=np.uint8).copy()
        )
    return record


@st.composite
def metric_record(draw) -> MetricRecord:
    record = metrics(draw(st.integers(1, 50)))
    for key in draw(st.lists(st.sampled_from([*protocol.TRAIN_METRICS, "extra"]), max_size=2)):
        if draw(st.booleans()) and key in record:
            del record[key]
        else:
            record[key] = draw(metric_value)
    return record


@st.composite
def any_reply(draw, node_id: int) -> Message:
    shape = draw(st.sampled_from(["honest", "arrays", "metrics", "records", "error"]))
    if shape == "error":
        return error_reply(node_id, draw(st.text(max_size=20)))
    if shape == "honest":
        return reply(node_id, encode_arrays(small_model(node_id), BFP(8)))
    if shape == "arrays":
        return reply(node_id, draw(arrays()))
    if shape == "metrics":
        return reply(node_id, encode_arrays(small_model(node_id), BFP(8)), draw(metric_record()))
    content = RecordDict(
        {protocol.ARRAY_RECORD: draw(arrays()), protocol.METRIC_RECORD: draw(metric_record())}
    )
    extra = draw(st.sampled_from(["array", "config", "metric", "none"]))
    if extra == "array":
        content["more"] = draw(arrays())
    elif extra == "config":
        content["config"] = ConfigRecord({"x": 1})
    elif extra == "metric":
        content["more"] = draw(metric_record())
    return Message(content, reply_to=train_message(node_id))


TRAVEL = {
    "weights": {},
    "deltas and a tracked downlink": {"upload": "delta", "upload-bits": 4, "downlink-bits": 8},
}


def chain(inner_name: str, travel: str = "weights"):
    cfg = AppConfig.from_run_config(
        {
            **default_run_config(),
            **TRAVEL[travel],
            "strategy.name": inner_name,
            "max-failed-rounds": 0,
        }
    )
    strategy = compose_strategy(cfg, build_strategy(cfg.strategy, cfg.strategy_params))
    nodes = [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)]
    grid = LocalGrid(client_app, nodes, {})
    model = ArrayRecord(small_model(0))
    list(strategy.configure_train(1, model, ConfigRecord(), grid))
    return strategy


@pytest.mark.parametrize("travel", sorted(TRAVEL))
@pytest.mark.parametrize("inner_name", INNER)
@settings(max_examples=40)
@given(data=st.data())
def test_no_reply_can_crash_the_strategy_or_poison_the_model(
    inner_name: str, travel: str, data
) -> None:
    strategy = chain(inner_name, travel)
    replies = [data.draw(any_reply(node_id)) for node_id in range(1, NODES + 1)]
    arrays, _ = strategy.aggregate_train(1, replies)  # must not raise
    if arrays is not None:
        model = arrays.to_torch_state_dict()
        assert set(model) == {"w", "b"}
        assert all(bool(torch.isfinite(t).all()) for t in model.values())
        assert all(float(t.abs().max()) <= 1e4 for t in model.values())


def nan_plain(node_id: int) -> Message:
    model = small_model(node_id)
    model["w"][0, 0] = float("nan")
    return reply(node_id, ArrayRecord(model))


def nan_raw(node_id: int) -> Message:
    model = small_model(node_id)
    model["b"][1] = float("nan")
    return reply(node_id, encode_arrays(model, BFP(8), keep_exact=["b"]))


def reshaped(node_id: int, name: str, shape: tuple[int, ...]) -> Message:
    model = small_model(node_id)
    model[name] = torch.zeros(shape)
    return reply(node_id, encode_arrays(model, BFP(8)))


def claiming(node_id: int, **values) -> Message:
    record = metrics()
    for key, value in values.items():
        record[key] = value
    return reply(node_id, encode_arrays(small_model(node_id), BFP(8)), record)


def renamed(node_id: int) -> Message:
    model = small_model(node_id)
    model["weight"] = model.pop("w")
    return reply(node_id, encode_arrays(model, BFP(8)))


def two_array_records(node_id: int) -> Message:
    content = RecordDict(
        {
            protocol.ARRAY_RECORD: encode_arrays(small_model(node_id), BFP(8)),
            "second": encode_arrays(small_model(node_id), BFP(8)),
            protocol.METRIC_RECORD: metrics(),
        }
    )
    return Message(content, reply_to=train_message(node_id))


ATTACKS = {
    "NaN in a plain record": nan_plain,
    "NaN in a raw-marked float tensor": nan_raw,
    "a transposed weight": lambda n: reshaped(n, "w", (3, 4)),
    "a wrongly shaped bias": lambda n: reshaped(n, "b", (5,)),
    "renamed tensors": renamed,
    "two ArrayRecords": two_array_records,
    "num-examples 1e12": lambda n: claiming(n, **{protocol.NUM_EXAMPLES: 10**12}),
    "num-examples as a list": lambda n: claiming(n, **{protocol.NUM_EXAMPLES: [1, 2]}),
    "num-examples 0": lambda n: claiming(n, **{protocol.NUM_EXAMPLES: 0}),
    "a list-valued metric": lambda n: claiming(n, **{protocol.TRAIN_LOSS: [0.1]}),
    "an extra metric": lambda n: claiming(n, extra=1.0),
}


@pytest.mark.parametrize("inner_name", INNER)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_each_known_attack_under_each_inner_strategy(inner_name: str, attack: str) -> None:
    strategy = chain(inner_name)
    honest = [reply(n, encode_arrays(small_model(n), BFP(8))) for n in (1, 2, 3)]
    arrays, _ = strategy.aggregate_train(1, [*honest, ATTACKS[attack](4)])
    assert arrays is not None
    model = arrays.to_torch_state_dict()
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
    dropped = strategy.dropped(1)
    if attack == "num-examples 1e12":  # not dropped: clipped to the median claim
        assert dropped == []
    else:
        assert [d.node_id for d in dropped] == [4], dropped
