"""Run a federation without Ray or a SuperLink: deterministic, in this process or a pool.

``LocalGrid`` delivers each message to a real ``ClientApp`` through Flower's own object
serialization (deflate/inflate), so replies are what a SuperLink would hand the
strategy; each node keeps its ``Context`` (and so its state) across rounds. With
``workers=N`` the ClientApps run in N worker processes (each node always in the same
one, which keeps its context), so the sampled clients of a round train side by side, on
the CPU cores or sharing a GPU. ``simulate`` runs the fedlpt ServerApp on it. Tests and
benchmarks use it; ``flwr run`` uses Flower's simulation engine or real SuperNodes.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import traceback
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


def _identify_as_serverapp() -> None:
    """Messages read the sender's identity from the process, as in a ServerApp process."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1


def _contexts(node_configs: Iterable[tuple[int, Mapping[str, Any]]], run_config) -> dict:
    return {
        node_id: Context(
            run_id=1,
            node_id=node_id,
            node_config=dict(config),
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for node_id, config in node_configs
    }


def _call(app: ClientApp, message: Message, context: Context) -> Message:
    """The node's reply; an exception becomes an error reply, as a SuperNode makes it."""
    try:
        return app(message, context)
    except Exception as err:
        error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err)}:<'{err}'>")
        return Message(error, reply_to=message)


class LocalGrid(Grid):
    """A Grid whose nodes are ``ClientApp`` calls in this process or in worker processes.

    Args:
        app: the ClientApp every node runs (with workers, the fedlpt ClientApp).
        node_configs: one node config per node (e.g. partition-id, num-partitions).
        run_config: the run config all nodes see.
        reply_hook: optional ``f(node_id, reply) -> reply`` to tamper with replies;
            returning None models a node that never answers (a timeout).
        workers: run the ClientApps in this many worker processes (0: in this process).
            Call :meth:`close` (or use the grid as a context manager) to stop them.

    ``delivered`` holds the messages of the latest ``send_and_receive`` that sent any,
    so memory stays flat however many rounds run. ``contexts`` holds the nodes' contexts
    when they run in this process.
    """

    def __init__(
        self,
        app: ClientApp,
        node_configs: list[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        reply_hook: ReplyHook | None = None,
        workers: int = 0,
    ) -> None:
        self.app = app
        self.reply_hook = reply_hook
        self._run = Run.create_empty(run_id=1)
        _identify_as_serverapp()
        self._ids = itertools.count(1)
        nodes = list(enumerate(node_configs, start=101))
        self.node_ids = [node_id for node_id, _ in nodes]
        self._pending: dict[str, Message] = {}
        self.delivered: list[Message] = []
        self.contexts: dict[int, Context] = {}
        self._pool: _WorkerPool | None = None
        if workers > 0:
            self._pool = _WorkerPool(workers, nodes, run_config)
        else:
            self.contexts = _contexts(nodes, run_config)

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
        return list(self.node_ids)

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
        messages = [_round_trip(self._pending.pop(message_id)) for message_id in message_ids]
        self.delivered.extend(messages)
        if self._pool is not None:
            raw_replies = self._pool.run(messages)
        else:
            raw_replies = [
                _call(self.app, m, self.contexts[m.metadata.dst_node_id]) for m in messages
            ]
        replies = []
        for message, reply in zip(messages, raw_replies, strict=True):
            if self.reply_hook is not None:
                reply = self.reply_hook(message.metadata.dst_node_id, reply)
                if reply is None:
                    continue
            replies.append(_round_trip(reply))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> LocalGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _WorkerPool:
    """Worker processes, each running the fedlpt ClientApp for a fixed set of nodes."""

    def __init__(self, workers: int, nodes: list[tuple[int, Mapping[str, Any]]], run_config):
        # Spawned, not forked: a CUDA context does not survive a fork.
        spawn = multiprocessing.get_context("spawn")
        self.results = spawn.Queue()
        self.inboxes = []
        self.processes = []
        self.home = {node_id: index % workers for index, (node_id, _) in enumerate(nodes)}
        for worker in range(workers):
            inbox = spawn.Queue()
            own = [(n, c) for n, c in nodes if self.home[n] == worker]
            process = spawn.Process(
                target=_worker_main,
                args=(inbox, self.results, own, dict(run_config)),
                name=f"fedlpt-clients-{worker}",
                daemon=True,
            )
            process.start()
            self.inboxes.append(inbox)
            self.processes.append(process)

    def run(self, messages: list[Message]) -> list[Message]:
        for index, message in enumerate(messages):
            self.inboxes[self.home[message.metadata.dst_node_id]].put((index, message))
        replies: list[Message | None] = [None] * len(messages)
        for _ in messages:
            index, reply = self.results.get()
            if isinstance(reply, str):  # a worker died: say how
                raise RuntimeError(f"a ClientApp worker failed:\n{reply}")
            replies[index] = reply
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


def _worker_main(inbox, results, nodes, run_config) -> None:  # pragma: no cover (subprocess)
    """A worker: the contexts of its nodes, the ClientApp, one message at a time."""
    import torch

    torch.set_num_threads(int(os.environ.get("FEDLPT_WORKER_THREADS", "1")))
    _identify_as_serverapp()
    contexts = _contexts(nodes, run_config)
    while (job := inbox.get()) is not None:
        index, message = job
        try:
            reply = _call(client_app, message, contexts[message.metadata.dst_node_id])
        except BaseException:
            results.put((index, traceback.format_exc()))
            return
        results.put((index, reply))


def simulate(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    *,
    reply_hook: ReplyHook | None = None,
    write_results: bool = False,
    workers: int = 0,
) -> RunOutcome:
    """Run the fedlpt ServerApp with ``num_supernodes`` in-process ClientApps.

    ``run_config`` overrides the defaults of ``pyproject.toml`` (flattened keys such as
    ``"strategy.name"``). Partitions are ``partition-id = 0..N-1`` of ``N``. With
    ``workers``, the ClientApps run in that many worker processes.
    """
    config = {**default_run_config(), **dict(run_config)}
    nodes = [{"partition-id": i, "num-partitions": num_supernodes} for i in range(num_supernodes)]
    with LocalGrid(client_app, nodes, config, reply_hook=reply_hook, workers=workers) as grid:
        return run_server(grid, config, write_results=write_results)
