"""DeltaSync on hand-made messages: per-node downlink differences with error feedback, and
delta uploads rebuilt on what each node holds."""

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedlpt import protocol
from fedlpt.client_app import app as client_app
from fedlpt.inprocess import LocalGrid
from fedlpt.quant import BFP, quantize
from fedlpt.strategy.delta import DeltaSync
from tests.strategy.replies import error_reply, reply, small_model

DOWN = BFP(4, "row", "stochastic")
NODES = (101, 102)


def grid() -> LocalGrid:
    nodes = [{"partition-id": i, "num-partitions": len(NODES)} for i in range(len(NODES))]
    return LocalGrid(client_app, nodes, {})


def send(sync: DeltaSync, server_round: int, model: dict[str, torch.Tensor]) -> dict:
    """``{node: (base round, arrays)}`` of the train messages of a round."""
    config = ConfigRecord()
    messages = sync.configure_train(server_round, ArrayRecord(model), config, grid())
    return {
        m.metadata.dst_node_id: (
            m.content["config"][protocol.DOWNLINK_BASE],
            m.content["arrays"].to_torch_state_dict(),
        )
        for m in messages
    }


def answer(sync: DeltaSync, server_round: int, nodes=NODES, deltas=None) -> None:
    deltas = deltas or {}
    replies = [reply(n, ArrayRecord(deltas.get(n, small_model(n)))) for n in nodes]
    sync.aggregate_train(server_round, replies)


def test_a_node_gets_the_full_model_first_then_differences_to_its_copy() -> None:
    sync = DeltaSync(FedAvg(), delta_uploads=False, downlink=DOWN)
    first = small_model(0)
    sent = send(sync, 1, first)
    assert {base for base, _ in sent.values()} == {protocol.FULL_MODEL}
    full = sent[101][1]["w"]  # one rounding for every new node, in the downlink format
    assert torch.equal(full, quantize(full, DOWN)) and not torch.equal(full, first["w"])
    assert all(torch.equal(arrays["w"], full) for _, arrays in sent.values())
    assert all(torch.equal(sync._pending[n][1]["w"], full) for n in NODES)
    held = sent[101][1]
    answer(sync, 1)
    second = {k: v + 0.01 for k, v in first.items()}
    sent = send(sync, 2, second)
    for node, (base, difference) in sent.items():
        assert base == 1
        assert torch.equal(difference["w"], quantize(difference["w"], DOWN))  # on the grid
        copy = {k: held[k] + difference[k] for k in held}
        assert torch.equal(copy["w"], sync._pending[node][1]["w"])


def test_the_copy_tracks_the_model_where_rounding_the_whole_model_drifts() -> None:
    """Ten rounds of small steps: with feedback the node's copy stays within one rounding
    of a small difference; rounding the whole model each round costs a whole-model step."""
    sync = DeltaSync(FedAvg(), delta_uploads=False, downlink=DOWN)
    generator = torch.Generator().manual_seed(0)
    model = small_model(0)
    copy = None
    for server_round in range(1, 11):
        model = {k: v + 0.003 * torch.randn(v.shape, generator=generator) for k, v in model.items()}
        base, arrays = send(sync, server_round, model)[101]
        copy = arrays if base == protocol.FULL_MODEL else {k: copy[k] + arrays[k] for k in copy}
        answer(sync, server_round)
    tracked = (copy["w"] - model["w"]).abs().max()
    rounded = (quantize(model["w"], DOWN) - model["w"]).abs().max()
    assert tracked < rounded / 10


def test_a_node_that_did_not_answer_gets_the_full_model_again() -> None:
    sync = DeltaSync(FedAvg(), delta_uploads=False, downlink=DOWN)
    send(sync, 1, small_model(0))
    answer(sync, 1)
    send(sync, 2, small_model(1))
    sync.aggregate_train(2, [reply(101, ArrayRecord(small_model(3))), error_reply(102, "x")])
    sent = send(sync, 3, small_model(2))
    assert sent[101][0] == 2 and sent[102][0] == protocol.FULL_MODEL


def test_delta_uploads_are_rebuilt_on_what_the_node_trained_from() -> None:
    sync = DeltaSync(FedAvg(), delta_uploads=True, downlink=None)
    sent_model = small_model(0)
    config = ConfigRecord()
    list(sync.configure_train(1, ArrayRecord(sent_model), config, grid()))
    assert config[protocol.UPLOAD_KIND] == "delta"
    one = {k: torch.full_like(v, 0.5) for k, v in sent_model.items()}
    two = {k: torch.full_like(v, -0.5) for k, v in sent_model.items()}
    arrays, _ = sync.aggregate_train(
        1, [reply(101, ArrayRecord(one)), reply(102, ArrayRecord(two))]
    )
    result = arrays.to_torch_state_dict()
    assert torch.allclose(result["w"], sent_model["w"])  # the deltas cancel out


def test_the_copies_survive_a_checkpoint() -> None:
    sync = DeltaSync(FedAvg(), delta_uploads=False, downlink=DOWN)
    send(sync, 1, small_model(0))
    answer(sync, 1)
    restored = DeltaSync(FedAvg(), delta_uploads=False, downlink=DOWN)
    restored.load_state_dict(sync.state_dict())
    assert send(restored, 2, small_model(1))[101][0] == 1
