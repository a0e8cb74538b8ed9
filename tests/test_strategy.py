"""QuantizedStrategy on an in-process Grid: any inner strategy, EMA, drops, bytes, downlink."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import strategy as flwr_strategies

from fedlpt.inprocess import LocalGrid, simulate
from fedlpt.quant import BFP, quantize
from fedlpt.quant.wire import MANIFEST_KEY, is_encoded, to_state_dict
from fedlpt.strategy import QuantizedStrategy, build_strategy

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
    ],
)
def test_wrapper_trains_with_every_inner_strategy(name: str) -> None:
    outcome = simulate({**FAST, "strategy.name": name}, 3)
    arrays = to_state_dict(outcome.result.arrays)
    assert arrays and all(v.dtype == torch.float32 for v in arrays.values())
    assert all(torch.isfinite(v).all() for v in arrays.values())
    for server_round in (1, 2):
        traffic = outcome.strategy.traffic[server_round]
        assert traffic.replies == 3 and traffic.dropped == []
        # FP32 down, 8-bit up; the small MLP's framing and metrics keep it below 4.
        assert 3.7 < traffic.bytes_down / traffic.bytes_up < 4.0
    assert [r["round"] for r in outcome.recorder.rows] == [0, 1, 2]


def test_fedprox_sends_its_proximal_term_to_the_clients() -> None:
    from fedlpt.client_app import app as client_app
    from fedlpt.config import default_run_config
    from fedlpt.server_app import run_server

    config = {
        **default_run_config(),
        **FAST,
        "num-server-rounds": 1,
        "strategy.name": "fedprox",
        "strategy.fedprox.proximal-mu": 0.25,
    }
    grid = LocalGrid(client_app, [{"partition-id": 0, "num-partitions": 1}], config)
    outcome = run_server(
        grid,
        {**config, "strategy.min-available-nodes": 1, "strategy.min-train-nodes": 1},
        write_results=False,
    )
    assert isinstance(outcome.strategy.inner, flwr_strategies.FedProx)
    assert grid.delivered[0].content["config"]["proximal-mu"] == 0.25


def test_a_malformed_reply_is_dropped_with_a_reason_and_the_round_goes_on() -> None:
    def corrupt(node_id: int, reply: Message) -> Message:
        if node_id == 101 and reply.content.array_records:
            arrays = reply.content["arrays"]
            arrays[MANIFEST_KEY] = Array(np.frombuffer(b'{"format": "nope"}', np.uint8))
        return reply

    outcome = simulate(FAST, 3, reply_hook=corrupt)
    for server_round in (1, 2):
        traffic = outcome.strategy.traffic[server_round]
        assert traffic.replies == 3
        assert len(traffic.dropped) == 1 and "node 101" in traffic.dropped[0]
        assert "does not declare format" in traffic.dropped[0]
    assert outcome.result.train_metrics_clientapp[2]["replies-dropped"] == 1
    assert len(to_state_dict(outcome.result.arrays)) > 0


def test_fedadam_aggregates_come_back_as_float32() -> None:
    outcome = simulate({**FAST, "strategy.name": "fedadam"}, 2)
    assert all(v.dtype == torch.float32 for v in to_state_dict(outcome.result.arrays).values())


def test_downlink_is_quantized_after_the_inner_strategy_saw_fp32() -> None:
    from fedlpt.client_app import app as client_app
    from fedlpt.config import default_run_config

    config = {**default_run_config(), **FAST}
    grid = LocalGrid(
        client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], config
    )
    inner = build_strategy("fedadam", {"fraction-evaluate": 0.0})
    downlink = BFP(8, "row", "nearest")
    strategy = QuantizedStrategy(inner, upload=BFP(8), downlink=downlink, ema_decay=None)
    torch.manual_seed(0)
    from fedlpt.models import MLP

    initial = MLP(64, 10).state_dict()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)
    sent = grid.delivered[0].content["arrays"]
    assert is_encoded(sent)
    received = to_state_dict(sent)
    for name, value in initial.items():
        assert torch.equal(received[name], quantize(value, downlink))
    # FedAdam kept the exact FP32 model as its reference point, not the quantized one.
    for name, value in inner.current_arrays.items():
        assert value.dtype == np.float32
        assert np.array_equal(value, initial[name].numpy())
    assert strategy.traffic[1].bytes_down < strategy.traffic[1].bytes_up * 1.05


def test_server_ema_follows_the_paper_formula() -> None:
    strategy = QuantizedStrategy(build_strategy("fedavg"), upload=None, ema_decay=0.9, ema_start=2)
    first = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(1)}
    second = {"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(2)}
    assert strategy.ema is None
    out = strategy._update_ema(first)  # round ema_start: a copy
    assert torch.equal(out["w"], first["w"])
    out = strategy._update_ema(second)
    assert torch.allclose(out["w"], 0.9 * first["w"] + 0.1 * second["w"])
    assert out["steps"].item() == 2  # non-float buffers follow the aggregate


def test_ema_starts_at_the_configured_round() -> None:
    with_late_ema = simulate({**FAST, "num-server-rounds": 3, "ema-start": 3}, 2)
    no_ema = simulate({**FAST, "num-server-rounds": 3, "ema": False}, 2)
    rows_late, rows_none = with_late_ema.recorder.rows, no_ema.recorder.rows
    # Same until the EMA starts (deterministic runs), then the EMA copy equals round 3.
    assert [r["accuracy"] for r in rows_late[:3]] == [r["accuracy"] for r in rows_none[:3]]


def test_a_node_config_can_lower_one_devices_bits() -> None:
    payloads: dict[int, int] = {}

    def record(node_id: int, reply: Message) -> Message:
        if reply.content.metric_records:
            payloads[node_id] = int(reply.content["metrics"]["payload-bytes"])
            assert reply.content["metrics"]["bits"] == (4 if node_id == 102 else 8)
        return reply

    from fedlpt.client_app import app as client_app
    from fedlpt.config import default_run_config

    config = {**default_run_config(), **FAST, "num-server-rounds": 1}
    nodes = [
        {"partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2, "bits": 4},
    ]
    grid = LocalGrid(client_app, nodes, config, reply_hook=record)
    from fedlpt.server_app import run_server

    outcome = run_server(grid, config, write_results=False)
    assert outcome.strategy.traffic[1].dropped == []
    assert payloads[102] < 0.6 * payloads[101]


def test_unknown_strategies_and_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        build_strategy("fedsgd")
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['momentum'\]"):
        build_strategy("fedavg", {"momentum": 0.9})
    with pytest.raises(TypeError, match="Flower Strategy"):
        QuantizedStrategy(object(), upload=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ema-decay"):
        QuantizedStrategy(build_strategy("fedavg"), upload=None, ema_decay=1.0)


def test_results_folder_has_json_csv_plots_and_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLPT_RESULTS_DIR", str(tmp_path))
    outcome = simulate(FAST, 2, write_results=True)
    folder = outcome.recorder.folder
    assert folder.parent == tmp_path
    report = json.loads((folder / "results.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["rounds"][2]["cumulative-mb"] > report["rounds"][1]["cumulative-mb"] > 0
    assert report["config"]["bits"] == 8 and report["summary"]["rounds"] == 2
    assert (folder / "metrics.csv").read_text().startswith("round,accuracy,loss,")
    for plot in ("accuracy.png", "accuracy_vs_mb.png"):
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = torch.load(folder / "model.pt")
    assert set(model) == set(to_state_dict(outcome.result.arrays))


def test_reply_without_arrays_is_dropped() -> None:
    def strip(node_id: int, reply: Message) -> Message:
        if node_id == 102 and reply.content.array_records:
            del reply.content["arrays"]
        return reply

    outcome = simulate({**FAST, "num-server-rounds": 1}, 2, reply_hook=strip)
    assert "no ArrayRecord 'arrays'" in outcome.strategy.traffic[1].dropped[0]
