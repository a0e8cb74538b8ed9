"""LocalGrid: Flower's serialization in process, error replies, flat memory."""

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedlpt.client_app import app as client_app
from fedlpt.config import default_run_config
from fedlpt.inprocess import LocalGrid
from tests.strategy.replies import small_model


def grid_of(n: int, **overrides) -> LocalGrid:
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    return LocalGrid(client_app, nodes, {**default_run_config(), **overrides})


def train_message(grid: LocalGrid, node_id: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(small_model()),
            "config": ConfigRecord({"server-round": 1, "fedlpt.upload.bits": 32}),
        }
    )
    return grid.create_message(content, MessageType.TRAIN, node_id, group_id="1")


def test_a_client_that_raises_answers_with_an_error_reply_as_a_supernode_does() -> None:
    grid = grid_of(2, model="mlp")
    # A model of the wrong shape for the MLP: load_state_dict raises inside the ClientApp.
    replies = list(grid.send_and_receive([train_message(grid, 101)]))
    (reply,) = replies
    assert reply.has_error() and "RuntimeError" in reply.error.reason
    assert reply.metadata.src_node_id == 101


def test_only_the_latest_messages_are_kept() -> None:
    grid = grid_of(2, model="mlp")
    grid.send_and_receive([train_message(grid, 101), train_message(grid, 102)])
    grid.send_and_receive([train_message(grid, 102)])
    assert [m.metadata.dst_node_id for m in grid.delivered] == [102]
    assert sorted(grid.get_node_ids()) == [101, 102]
