"""TrafficMeter on hand-made messages: bytes out once per shared record, replies as received."""

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedlpt.client_app import app as client_app
from fedlpt.inprocess import LocalGrid
from fedlpt.quant import BFP
from fedlpt.quant.wire import encode_arrays
from fedlpt.strategy.codec import CodecStrategy
from fedlpt.strategy.traffic import RoundTraffic, TrafficMeter, serialized_size
from tests.strategy.replies import error_reply, reply, small_model


def test_bytes_down_count_every_message_and_bytes_up_every_reply_as_received() -> None:
    meter = TrafficMeter(CodecStrategy(FedAvg(), upload=BFP(8)))
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    arrays = ArrayRecord(small_model())
    messages = list(
        meter.configure_train(1, arrays, ConfigRecord(), LocalGrid(client_app, nodes, {}))
    )
    per_message = serialized_size(messages[0].content)
    packed = encode_arrays(small_model(1), BFP(8))
    replies = [reply(1, ArrayRecord(small_model(1))), reply(2, packed), error_reply(3, "boom")]
    as_received = sum(serialized_size(r.content) for r in replies[:2])
    meter.aggregate_train(1, replies)  # the codec decodes them in place
    traffic = meter.traffic[1]
    assert traffic.bytes_down == 3 * per_message
    assert traffic.bytes_up == as_received
    assert traffic.replies == 3
    assert traffic.total == traffic.bytes_down + traffic.bytes_up


def test_an_8_bit_record_is_about_a_quarter_of_fp32_as_flower_sends_it() -> None:
    model = {"w": torch.randn(1024, 256)}
    fp32 = serialized_size(ArrayRecord(model))
    assert 3.9 < fp32 / serialized_size(encode_arrays(model, BFP(8))) < 4.0


def test_traffic_survives_a_checkpoint() -> None:
    meter = TrafficMeter(FedAvg())
    meter.traffic[1] = RoundTraffic(1, bytes_down=10, bytes_up=3, replies=2)
    restored = TrafficMeter(FedAvg())
    restored.load_state_dict(meter.state_dict())
    assert restored.traffic == meter.traffic
