"""Run a federation inside one process: deterministic, no Ray, no SuperLink.

``LocalGrid`` delivers each message to a real ``ClientApp`` in this process, in order,
through Flower's own object serialization (deflate/inflate), so replies are what a
SuperLink would hand the strategy; each node keeps its ``Context`` (and so its state)
across rounds. ``simulate`` runs the fedlpt ServerApp logic on it. Tests and benchmarks
use it; ``flwr run`` uses Flower's simulation engine or real SuperNodes instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .client_app import app as client_app
from .config import default_run_config
from .server_app import RunOutcome, run_server

ReplyHook = Callable[[int, Message], Message | None]


def _round_trip(message: Message) -> Message:
    """The message as the receiver rebuilds it from Flower's deflated objects."""
    if not message.has_content():  # an error reply carries no records
        return message
    inflated: dict[str, Any] = {}
    # Post-order: every object's children are inflated before the object itself.
    for object_id, obj in get_all_nested_objects(message.content).items():
        children = {cid: inflated[cid] for cid in obj.children or {}}
        inflated[object_id] = type(obj).inflate(obj.deflate(), children or None)
    return Message(content=inflated[message.content.object_id], metadata=message.metadata)


class LocalGrid(Grid):
    """A Grid whose nodes are ``ClientApp`` calls in this process.

    Args:
        app: the ClientApp every node runs.
        node_configs: one node config per node (e.g. partition-id, num-partitions).
        run_config: the run config all nodes see.
        reply_hook: optional ``f(node_id, reply) -> reply`` to tamper with replies;
            returning None models a node that never answers (a timeout).

    ``delivered`` holds the messages of the latest ``send_and_receive`` that sent any,
    so memory stays flat however many rounds run.
    """

    def __init__(
        self,
        app: ClientApp,
        node_configs: list[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        reply_hook: ReplyHook | None = None,
    ) -> None:
        self.app = app
        self.reply_hook = reply_hook
        self._run = Run.create_empty(run_id=1)
        # Messages read the sender's identity from the process, as in a ServerApp process.
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1
        self._ids = itertools.count(1)
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=dict(config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id, config in enumerate(node_configs, start=101)
        }
        self._pending: dict[str, Message] = {}
        self.delivered: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages:
            self.delivered = []
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            message = _round_trip(self._pending.pop(message_id))
            self.delivered.append(message)
            node_id = message.metadata.dst_node_id
            try:
                reply = self.app(message, self.contexts[node_id])
            except Exception as err:  # as a SuperNode does: the server gets an error reply
                reason = f"{type(err)}:<'{err}'>"
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message
                )
            if self.reply_hook is not None:
                reply = self.reply_hook(node_id, reply)
                if reply is None:
                    continue
            replies.append(_round_trip(reply))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def simulate(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    *,
    reply_hook: ReplyHook | None = None,
    write_results: bool = False,
) -> RunOutcome:
    """Run the fedlpt ServerApp with ``num_supernodes`` in-process ClientApps.

    ``run_config`` overrides the defaults of ``pyproject.toml`` (flattened keys such as
    ``"strategy.name"``). Partitions are ``partition-id = 0..N-1`` of ``N``.
    """
    config = {**default_run_config(), **dict(run_config)}
    nodes = [{"partition-id": i, "num-partitions": num_supernodes} for i in range(num_supernodes)]
    grid = LocalGrid(client_app, nodes, config, reply_hook=reply_hook)
    return run_server(grid, config, write_results=write_results)
