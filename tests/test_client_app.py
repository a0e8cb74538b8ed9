"""The ClientApp through an in-process grid: what it reads, what it replies, its node config."""

import pytest
import torch
from flwr.app import Message

from fedlpt import protocol
from fedlpt.client_app import app as client_app
from fedlpt.config import ConfigError, default_run_config
from fedlpt.inprocess import LocalGrid
from fedlpt.quant import BFP, quantize
from fedlpt.quant.wire import decode_arrays, read_manifest
from fedlpt.server_app import run_server
from fedlpt.strategy.delta import DeltaSync
from fedlpt.strategy.traffic import serialized_size

FAST = {"model": "mlp", "num-server-rounds": 1, "batch-size": 64}


def run(nodes: list[dict], **overrides) -> tuple:
    config = {**default_run_config(), **FAST, **overrides}
    replies: dict[int, Message] = {}

    def keep(node_id: int, reply: Message) -> Message:
        replies[node_id] = reply
        return reply

    grid = LocalGrid(client_app, nodes, config, reply_hook=keep)
    outcome = run_server(grid, config, write_results=False)
    return outcome, grid, replies


def test_a_reply_carries_the_model_and_exactly_the_protocols_metrics() -> None:
    _, _, replies = run([{"partition-id": i, "num-partitions": 2} for i in range(2)])
    for reply in replies.values():
        assert set(reply.content.array_records) == {protocol.ARRAY_RECORD}
        assert set(reply.content.metric_records) == {protocol.METRIC_RECORD}
        assert set(reply.content[protocol.METRIC_RECORD]) == set(protocol.TRAIN_METRICS)
        assert not reply.content.config_records


def test_a_node_config_can_lower_one_devices_bits_or_make_it_fp32() -> None:
    nodes = [
        {"partition-id": 0, "num-partitions": 3},
        {"partition-id": 1, "num-partitions": 3, "bits": 4},
        {"partition-id": 2, "num-partitions": 3, "bits": 32},
    ]
    outcome, _, replies = run(nodes)
    assert outcome.strategy.dropped(1) == []
    bits = {n: r.content["metrics"]["bits"] for n, r in replies.items()}
    assert bits == {101: 8, 102: 4, 103: 32}
    sizes = {n: serialized_size(r.content) for n, r in replies.items()}
    assert sizes[102] < 0.6 * sizes[101] < 0.2 * sizes[103]
    assert {e["bits"] for e in read_manifest(replies[102].content["arrays"])} == {4}
    assert outcome.recorder.precision() == "mixed: FP32 x1, 8-bit x1, 4-bit x1"
    assert outcome.recorder.nodes[102]["bits"] == [4]
    assert outcome.recorder.nodes[102]["bytes-up"] == sizes[102]


def test_fedprox_sends_mu_and_nothing_else_the_client_does_not_read() -> None:
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    _, grid, _ = run(nodes, **{"strategy.name": "fedprox", "strategy.fedprox.proximal-mu": 0.25})
    config = grid.delivered[0].content["config"]
    assert config[protocol.PROXIMAL_MU] == 0.25
    assert sorted(config) == sorted(
        [protocol.PROXIMAL_MU, protocol.SERVER_ROUND]
        + [protocol.UPLOAD_PREFIX + k for k in ("bits", "block", "rounding")]
    )


def test_a_misconfigured_node_answers_with_an_error_naming_the_key() -> None:
    nodes = [
        {"partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2, "bits": 1},
    ]
    outcome, _, replies = run(nodes)
    assert replies[102].has_error()
    assert "node config bits must be in 2..16 or 32 for FP32, got 1" in replies[102].error.reason
    assert outcome.strategy.traffic[1].replies == 2


def test_delta_uploads_with_feedback_and_a_tracked_downlink() -> None:
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    overrides = {"upload": "delta", "upload-bits": 4, "downlink-bits": 8, "num-server-rounds": 2}
    outcome, grid, replies = run(nodes, **overrides)
    assert all(outcome.strategy.dropped(r) == [] for r in (1, 2))
    assert {e["bits"] for e in read_manifest(replies[101].content["arrays"])} == {4}
    state = grid.contexts[101].state
    assert (
        state["fedlpt.model-round"]["round"] == 2 and state["fedlpt.residual-round"]["round"] == 2
    )
    residual = state["fedlpt.residual"].to_torch_state_dict()
    assert all(v.abs().max() > 0 for v in residual.values())  # rounding dropped something
    # The node decoded exactly the copy the server keeps for it (full model, then difference).
    sync = outcome.strategy
    while not isinstance(sync, DeltaSync):
        sync = sync.inner
    held = state["fedlpt.model"].to_torch_state_dict()
    assert sync.copies[101][0] == 2
    assert all(torch.equal(held[k], v) for k, v in sync.copies[101][1].items())
    assert {e["bits"] for e in read_manifest(grid.delivered[0].content["arrays"])} == {8}


def test_a_node_without_the_copy_the_server_assumes_says_so_and_gets_the_full_model() -> None:
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    grids: list[LocalGrid] = []

    def forget(node_id: int, reply: Message) -> Message:
        if node_id == 101 and not forgotten:  # after round 1: as if its state was lost
            grids[0].contexts[101].state["fedlpt.model-round"]["round"] = 99
            forgotten.append(node_id)
        return reply

    forgotten: list[int] = []
    config = {**default_run_config(), **FAST, "downlink-bits": 8, "num-server-rounds": 3}
    grid = LocalGrid(client_app, nodes, config, reply_hook=forget)
    grids.append(grid)
    outcome = run_server(grid, config, write_results=False)
    (dropped,) = outcome.strategy.dropped(2)
    assert dropped.node_id == 101
    assert "difference to the model of round 1, but this node holds round 99" in dropped.reason
    assert outcome.strategy.dropped(3) == []  # round 3 sent it the full model


def test_zstd_uploads_are_never_larger_and_aggregate_like_plain_ones(monkeypatch) -> None:
    # After one round from a uniform initialization the codes are close to uniform too:
    # zstd then saves nothing, and the client sends the plain record (bench.codec
    # measures the gain on a trained ConvNet).
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    plain, _, plain_replies = run(nodes)
    packed, _, packed_replies = run(nodes, compress="zstd")
    assert packed.strategy.dropped(1) == []
    for node, reply in packed_replies.items():
        assert serialized_size(reply.content) <= serialized_size(plain_replies[node].content)
    # Lossless: the same seeds give the same global model either way.
    assert plain.recorder.rows[-1]["loss"] == pytest.approx(packed.recorder.rows[-1]["loss"])

    # A node without zstandard uploads uncompressed; the server still aggregates it.
    monkeypatch.setattr("fedlpt.client_app.zstd_available", lambda: False)
    fallback, _, fallback_replies = run(nodes, compress="zstd")
    assert fallback.strategy.dropped(1) == []
    sizes = {n: serialized_size(r.content) for n, r in fallback_replies.items()}
    assert sizes == {n: serialized_size(r.content) for n, r in plain_replies.items()}


def test_a_server_without_zstandard_refuses_a_zstd_run_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setattr("fedlpt.server_app.zstd_available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install "fedlpt\[compress\]"'):
        run([{"partition-id": 0, "num-partitions": 1}], compress="zstd")


def test_upload_block_sets_the_uploads_exponent_sharing_apart_from_trainings() -> None:
    nodes = [
        {"partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2, "upload-bits": 4},  # its own bits, same block
    ]
    common = {"block": "kernel", "upload": "delta", "upload-bits": 2}
    kernel, _, kernel_replies = run(nodes, **common)
    row, _, row_replies = run(nodes, **common, **{"upload-block": "row"})
    assert row.strategy.dropped(1) == [] and kernel.strategy.dropped(1) == []
    for node, bits in ((101, 2), (102, 4)):
        entries = read_manifest(row_replies[node].content["arrays"])
        assert {(e["bits"], e["block"]) for e in entries} == {(bits, "row")}
        # Per-kernel exponents cost 8 bits per 3x3 kernel and per classifier weight.
        row_size = serialized_size(row_replies[node].content)
        assert row_size < 0.8 * serialized_size(kernel_replies[node].content)


def test_nearest_rounded_delta_uploads_drop_at_most_what_nearest_rounding_drops() -> None:
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    overrides = {"upload": "delta", "upload-bits": 2, "upload-block": "row"}
    outcome, grid, replies = run(nodes, **overrides, **{"upload-rounding": "nearest"})
    assert outcome.strategy.dropped(1) == []
    assert grid.delivered[0].content["config"][protocol.UPLOAD_PREFIX + "rounding"] == "nearest"
    nearest = BFP(2, "row", "nearest")
    for node in (101, 102):
        sent = decode_arrays(replies[node].content["arrays"])
        residual = grid.contexts[node].state["fedlpt.residual"].to_torch_state_dict()
        # delta = sent + residual, and nearest rounding of the delta gives back what was sent:
        # with stochastic rounding some values would have gone to the other grid point.
        for name, values in sent.items():
            assert torch.equal(quantize(values + residual[name], nearest), values), name
        assert any(v.count_nonzero() < v.numel() for v in sent.values())  # small changes: 0


def test_downlink_block_sets_the_downlinks_exponent_sharing_apart_from_trainings() -> None:
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    common = {"block": "kernel", "downlink-bits": 8, "downlink-feedback": False}
    _, kernel, _ = run(nodes, **common)
    _, row, _ = run(nodes, **common, **{"downlink-block": "row"})
    for grid, block in ((kernel, "kernel"), (row, "row")):
        entries = read_manifest(grid.delivered[0].content["arrays"])
        assert {(e["bits"], e["block"]) for e in entries} == {(8, block)}
    sizes = [serialized_size(g.delivered[0].content) for g in (row, kernel)]
    assert sizes[0] < 0.9 * sizes[1]


def test_both_engines_send_the_same_bytes(monkeypatch) -> None:
    from fedlpt.quant import gemm

    # Every product through oneDNN's int8 (where present), however small the MLP's are.
    if gemm.available("onednn", "cpu"):
        monkeypatch.setenv(gemm.ENV_BACKEND, "onednn")
    gemm.forget_choice()
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    try:
        sent = {}
        for engine in ("emulated", "integer"):
            _, _, replies = run(nodes, engine=engine)
            sent[engine] = {
                node: {k: bytes(v.data) for k, v in reply.content["arrays"].items()}
                for node, reply in replies.items()
            }
    finally:
        gemm.forget_choice()
    assert sent["emulated"][101] != sent["emulated"][102]  # two nodes, two models
    assert sent["emulated"] == sent["integer"]
