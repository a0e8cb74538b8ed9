"""CodecStrategy on hand-made replies: formats announced, replies decoded or dropped, downlink."""

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedlpt.client_app import app as client_app
from fedlpt.inprocess import LocalGrid
from fedlpt.quant import BFP, quantize
from fedlpt.quant.wire import MANIFEST_KEY, encode_arrays, is_encoded, to_state_dict
from fedlpt.strategy.codec import CodecStrategy
from tests.strategy.replies import error_reply, reply, small_model

UPLOAD = BFP(8, "row", "nearest")


def grid(nodes: int = 2) -> LocalGrid:
    """A grid of in-process nodes; configure_* only asks it for node ids."""
    return LocalGrid(
        client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], {}
    )


def configured(codec: CodecStrategy, model: dict[str, torch.Tensor], server_round: int = 1):
    config = ConfigRecord()
    messages = list(codec.configure_train(server_round, ArrayRecord(model), config, grid()))
    return messages, config


def encoded(model: dict[str, torch.Tensor], fmt: BFP = UPLOAD) -> ArrayRecord:
    return encode_arrays(model, fmt)


def test_the_round_announces_the_upload_format_and_sends_fp32_by_default() -> None:
    model = small_model()
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    messages, config = configured(codec, model)
    assert config["fedlpt.upload.bits"] == 8 and config["fedlpt.upload.block"] == "row"
    assert len(messages) == 2
    sent = messages[0].content["arrays"]
    assert not is_encoded(sent)
    assert all(torch.equal(to_state_dict(sent)[k], v) for k, v in model.items())


def test_replies_are_decoded_to_fp32_before_the_inner_strategy_averages() -> None:
    model = small_model()
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    configured(codec, model)
    one, two = small_model(1), small_model(2)
    arrays, metrics = codec.aggregate_train(1, [reply(1, encoded(one)), reply(2, encoded(two))])
    assert arrays is not None and metrics is not None
    result = to_state_dict(arrays)
    for name in model:
        expected = (quantize(one[name], UPLOAD) + quantize(two[name], UPLOAD)) / 2
        assert torch.allclose(result[name], expected)
        assert result[name].dtype == torch.float32
    assert codec.own_dropped(1) == []


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda r: r.__setitem__(MANIFEST_KEY, Array(np.frombuffer(b"{}", np.uint8))), "manifest"),
        (lambda r: r.__delitem__(MANIFEST_KEY), r"missing \['b', 'w'\]"),
    ],
)
def test_a_malformed_payload_is_dropped_with_the_node_and_the_reason(tamper, reason) -> None:
    model = small_model()
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    configured(codec, model)
    bad = encoded(small_model(1))
    tamper(bad)
    arrays, _ = codec.aggregate_train(1, [reply(7, bad), reply(8, encoded(small_model(2)))])
    assert arrays is not None
    (dropped,) = codec.own_dropped(1)
    assert dropped.node_id == 7 and dropped.by == "codec"
    assert re.search(reason, dropped.reason), dropped.reason
    assert torch.allclose(to_state_dict(arrays)["w"], quantize(small_model(2)["w"], UPLOAD))


@pytest.mark.parametrize(
    "model_sent, reason",
    [
        ({"w": torch.zeros(4, 3)}, r"missing \['b'\]"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(4), "x": torch.zeros(1)}, "lists 3 tensors"),
        ({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, r"'w' is float32 \(3, 4\)"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(5)}, r"'b' is float32 \(5,\)"),
        ({"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(4)}, "float64"),
    ],
)
def test_a_reply_that_is_not_the_model_sent_is_dropped(model_sent, reason) -> None:
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    configured(codec, small_model())
    arrays, _ = codec.aggregate_train(
        1, [reply(3, encoded(model_sent)), reply(4, encoded(small_model()))]
    )
    assert arrays is not None
    (dropped,) = codec.own_dropped(1)
    assert dropped.node_id == 3
    assert re.search(reason, dropped.reason), dropped.reason


def test_a_reply_without_a_model_is_dropped_and_error_replies_reach_the_inner_strategy() -> None:
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    configured(codec, small_model())
    no_model = reply(5, encoded(small_model()))
    del no_model.content["arrays"]
    arrays, _ = codec.aggregate_train(
        1, [no_model, error_reply(6, "boom"), reply(4, encoded(small_model()))]
    )
    assert arrays is not None
    assert [d.reason for d in codec.own_dropped(1)] == ["reply has no ArrayRecord 'arrays'"]


def test_plain_fp32_replies_are_accepted() -> None:
    codec = CodecStrategy(FedAvg(), upload=None)
    _, config = configured(codec, small_model())
    assert config["fedlpt.upload.bits"] == 32 and "fedlpt.upload.block" not in config
    model = small_model(3)
    arrays, _ = codec.aggregate_train(1, [reply(1, ArrayRecord(model))])
    assert torch.equal(to_state_dict(arrays)["w"], model["w"])


def test_fedadam_keeps_fp32_and_the_aggregate_returns_in_the_models_dtypes() -> None:
    model = small_model()
    downlink = BFP(8, "row", "nearest")
    inner = FedAdam(fraction_evaluate=0.0)
    codec = CodecStrategy(inner, upload=UPLOAD, downlink=downlink)
    messages, _ = configured(codec, model)
    received = to_state_dict(messages[0].content["arrays"])
    assert is_encoded(messages[0].content["arrays"])
    for name, value in model.items():
        assert torch.equal(received[name], quantize(value, downlink))
        # FedAdam kept the exact FP32 model as its reference point, not the quantized one.
        assert np.array_equal(inner.current_arrays[name], value.numpy())
    arrays, _ = codec.aggregate_train(1, [reply(1, encoded(small_model(1)))])
    assert all(t.dtype == torch.float32 for t in to_state_dict(arrays).values())


def test_the_downlink_is_encoded_once_per_round_and_shared() -> None:
    codec = CodecStrategy(FedAvg(), upload=UPLOAD, downlink=BFP(4))
    messages, _ = configured(codec, small_model())
    assert messages[0].content["arrays"] is messages[1].content["arrays"]
    again, _ = configured(codec, small_model(), server_round=2)
    assert again[0].content["arrays"] is not messages[0].content["arrays"]


def test_a_reply_is_checked_against_the_model_before_it_is_decoded() -> None:
    # A manifest that declares another model is refused for that, whatever its buffers
    # hold: the check reads only the manifest, so a reply cannot make the server decode
    # more than the model it sent.
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    configured(codec, small_model())
    big = encoded({"w": torch.zeros(4, 3), "b": torch.zeros(4), "x": torch.zeros(10**6)})
    big["fedlpt.mantissas"] = Array(np.zeros(3, np.uint8))  # would fail to decode
    plain = ArrayRecord({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    codec.aggregate_train(1, [reply(3, big), reply(4, plain), reply(5, encoded(small_model()))])
    reasons = {d.node_id: d.reason for d in codec.own_dropped(1)}
    assert "lists 3 tensors, at most 2 expected" in reasons[3]
    assert "'w' is float32 (3, 4)" in reasons[4]


def test_a_manifest_longer_than_the_model_is_refused_before_its_entries_are_read() -> None:
    codec = CodecStrategy(FedAvg(), upload=UPLOAD)
    configured(codec, small_model())
    record = encoded(small_model())
    manifest = json.loads(record[MANIFEST_KEY].numpy().tobytes())
    manifest["tensors"] *= 20000  # 40,000 entries, about 3 MB: refused unparsed
    raw = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    record[MANIFEST_KEY] = Array(raw)
    codec.aggregate_train(1, [reply(3, record), reply(4, encoded(small_model()))])
    (dropped,) = codec.own_dropped(1)
    assert "manifest is" in dropped.reason and "(limit 3072)" in dropped.reason
