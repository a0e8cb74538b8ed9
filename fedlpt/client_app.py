"""fedlpt ClientApp: train locally in low precision, reply with a bit-packed model.

What a round asks (the upload format, FedProx's ``mu``) comes from the train message's
ConfigRecord; everything else from the run config and this node's ``--node-config`` (see
:mod:`fedlpt.protocol`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import protocol
from .config import AppConfig, ConfigError, NodeConfig
from .data import load_partition
from .quant import BFP, LowPrecision
from .quant.wire import encode_arrays, to_state_dict
from .task import build_model, resolve_device
from .task import evaluate as evaluate_model
from .task import train as train_model

app = ClientApp()

_OPTIMIZER_STATE = "fedlpt.optimizer"  # context.state: this node's optimizer state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Decode the global model, train it on this node's data, reply bit-packed."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    config = msg.content.config_records.get(protocol.CONFIG_RECORD, ConfigRecord())
    server_round = protocol.server_round(config)
    upload = _node_format(protocol.read_upload_format(config), node)
    device = resolve_device(cfg.device)

    model = _model_from(msg, cfg, device)
    trainloader, _ = _loaders(cfg, node, server_round)
    recipe = LowPrecision.uniform(
        None if upload is None else upload.bits,
        block=cfg.block_kind,
        rounding=cfg.rounding,
        quantize_optimizer_state=cfg.quantize_optimizer_state,
    )
    start = time.perf_counter()
    result, optimizer_state = train_model(
        model,
        trainloader,
        recipe=recipe,
        epochs=cfg.local_epochs,
        optimizer=cfg.optimizer,
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)),
        seed=_seed(cfg.seed, server_round, node.partition_id),
        optimizer_state=_load_optimizer_state(context),
    )
    train_seconds = time.perf_counter() - start
    _save_optimizer_state(context, optimizer_state)

    state = model.state_dict()
    if upload is None:
        arrays = ArrayRecord({k: v.cpu() for k, v in state.items()})
    else:  # the weights already sit on this grid: only buffers, if any, are rounded here
        generator = torch.Generator(device).manual_seed(
            _seed(cfg.seed, server_round, node.partition_id)
        )
        arrays = encode_arrays(state, upload, generator)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.TRAIN_LOSS: result.loss,
            protocol.BITS: 32 if upload is None else upload.bits,
            protocol.TRAIN_SECONDS: train_seconds,
        }
    )
    return Message(
        RecordDict({protocol.ARRAY_RECORD: arrays, protocol.METRIC_RECORD: metrics}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model (full precision) on this node's local hold-out."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    model = _model_from(msg, cfg, resolve_device(cfg.device))
    _, testloader = _loaders(cfg, node, server_round=0)
    loss, accuracy, examples = evaluate_model(model, testloader)
    if not examples:  # every node must reply with the same keys; weight 0 hides these
        loss, accuracy = 0.0, 0.0
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: examples,
            protocol.EVAL_LOSS: loss,
            protocol.EVAL_ACCURACY: accuracy,
        }
    )
    return Message(RecordDict({protocol.METRIC_RECORD: metrics}), reply_to=msg)


def _node_format(announced: BFP | None, node: NodeConfig) -> BFP | None:
    """The round's upload format, at this node's own bits when its node config sets them."""
    if node.bits is None or (announced is None and node.bits == 32):
        return announced
    if node.bits == 32:
        return None
    if announced is None:
        raise ConfigError(
            f"node config bits={node.bits} asks for low precision, but the run uploads FP32"
        )
    return BFP(node.bits, announced.block, announced.rounding)


def _loaders(cfg: AppConfig, node: NodeConfig, server_round: int) -> Any:
    """This node's train/test loaders; the train order is reshuffled every round.

    The local hold-out exists only when the clients evaluate (``fraction-evaluate`` > 0).
    """
    return load_partition(
        cfg.dataset,
        node.partition_id,
        node.num_partitions,
        alpha=cfg.alpha,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        partitioner=cfg.partitioner,
        test_fraction=cfg.local_test_fraction if cfg.client_evaluation else 0.0,
        data_dir=cfg.data_dir or None,
        shuffle_seed=_seed(cfg.seed, server_round, node.partition_id),
        max_examples=cfg.train_examples or None,
    )


def _model_from(msg: Message, cfg: AppConfig, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg.dataset, cfg.model)
    model.load_state_dict(to_state_dict(msg.content[protocol.ARRAY_RECORD]))
    return model.to(device)


def _seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, partition)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


def _save_optimizer_state(context: Context, state: dict[str, Any]) -> None:
    """Keep the optimizer's tensors in the node's persistent state (FP32, never sent)."""
    tensors = {
        f"{index}/{name}": value.cpu()
        for index, entries in state["state"].items()
        for name, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    context.state[_OPTIMIZER_STATE] = ArrayRecord(tensors)


def _load_optimizer_state(context: Context) -> dict[str, Any] | None:
    if _OPTIMIZER_STATE not in context.state.array_records:
        return None
    flat = context.state[_OPTIMIZER_STATE].to_torch_state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split("/", 1)
        per_param.setdefault(int(index), {})[name] = value
    return {"state": per_param}
