"""fedlpt ClientApp: train locally in low precision, reply with a bit-packed model.

What a round asks (the upload format, FedProx's ``mu``) comes from the train message's
ConfigRecord; everything else from the run config and this node's ``--node-config`` (see
:mod:`fedlpt.protocol`).
"""

from __future__ import annotations

import functools
import sys
import time
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from . import protocol
from .config import AppConfig, NodeConfig
from .data import load_partition
from .quant import BFP, quantize
from .quant.entropy import zstd_available
from .quant.wire import encode_arrays, to_state_dict
from .task import build_model, make_recipe, resolve_device
from .task import evaluate as evaluate_model
from .task import train as train_model

app = ClientApp()

# This node's persistent state (context.state), FP32 and never sent: its optimizer state,
# its copy of the global model (when the server tracks it) and its upload residual.
_OPTIMIZER_STATE = "fedlpt.optimizer"
_COPY, _COPY_ROUND = "fedlpt.model", "fedlpt.model-round"
_RESIDUAL, _RESIDUAL_ROUND = "fedlpt.residual", "fedlpt.residual-round"
Model = dict[str, torch.Tensor]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Decode the global model, train it on this node's data, reply bit-packed."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    _limit_threads()
    config = msg.content.config_records.get(protocol.CONFIG_RECORD, ConfigRecord())
    server_round = protocol.server_round(config)
    upload = _upload_format(protocol.read_upload_format(config), cfg, node)
    device = resolve_device(cfg.device)
    seed = _seed(cfg.seed, server_round, node.partition_id)

    received = _synced_model(to_state_dict(msg.content[protocol.ARRAY_RECORD]), config, context)
    model = build_model(cfg.dataset, cfg.model)
    model.load_state_dict(received)
    model.to(device)
    trainloader, _ = _loaders(cfg, node, server_round)
    recipe = make_recipe(
        cfg.role_bits(node),
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
        seed=seed,
        optimizer_state=_load_optimizer_state(context),
        engine=cfg.engine,
    )
    train_seconds = time.perf_counter() - start
    if not recipe.is_fp32:
        _log_engine(result.engine, cfg.engine)
    _save_optimizer_state(context, optimizer_state)

    state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    if config.get(protocol.UPLOAD_KIND) == "delta":
        state = _delta(state, received, upload, cfg, context, server_round, generator)
    # Weights already sit on the training grid and a delta on the upload grid: encoding
    # them is exact (only buffers, if any, are rounded here).
    arrays = (
        ArrayRecord(state)
        if upload is None
        else encode_arrays(state, upload, generator, compression=_compression(cfg))
    )
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


def _limit_threads() -> None:
    """Use as many torch threads as cores this ClientApp holds in Flower's simulation engine.

    There a ClientApp runs in a Ray actor that holds ``client-resources-num-cpus`` cores;
    torch's default pool (one thread per core of the machine) would oversubscribe them,
    which slows small operations down tens of times once actors share the cores.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def _compression(cfg: AppConfig) -> str:
    """The run's ``compress``, or ``"none"`` (logged) where this node lacks zstandard: the
    server decodes either, and a bigger upload beats a node that fails every round."""
    if cfg.compress == "zstd" and not zstd_available():
        _warn_uncompressed()
        return "none"
    return cfg.compress


@functools.cache
def _log_engine(engine: str, asked: str) -> None:
    log(INFO, "fedlpt: this node trains on the %s engine (engine = %r)", engine, asked)


@functools.cache
def _warn_uncompressed() -> None:
    log(
        WARNING,
        'compress = "zstd", but this node lacks the zstandard library: uploading '
        'uncompressed (pip install "fedlpt[compress]" to compress)',
    )


def _upload_format(announced: BFP | None, cfg: AppConfig, node: NodeConfig) -> BFP | None:
    """The round's upload format, at this node's own bits when its node config sets them."""
    if not node.precision:
        return announced
    bits = cfg.upload_bits_of(node)
    if bits == 32:
        return None
    if announced is None:
        return BFP(bits, cfg.upload_block_kind, cfg.upload_rounding_kind)  # type: ignore[arg-type]
    return BFP(bits, announced.block, announced.rounding)


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


def _synced_model(received: Model, config: ConfigRecord, context: Context) -> Model:
    """The global model this node trains from, and its kept copy when the server tracks it.

    Raises:
        ValueError: the server sent a difference to a copy this node does not hold (the
            server then sends the full model next time).
    """
    if protocol.DOWNLINK_BASE not in config:
        return received
    base = config[protocol.DOWNLINK_BASE]
    if base == protocol.FULL_MODEL:
        model = received
    else:
        held = context.state.config_records.get(_COPY_ROUND, {}).get("round")
        if held != base:
            raise ValueError(
                f"the server sent a difference to the model of round {base}, but this node "
                f"holds {'none' if held is None else f'round {held}'}"
            )
        copy = context.state[_COPY].to_torch_state_dict()
        model = {k: copy[k] + v if v.is_floating_point() else v for k, v in received.items()}
    context.state[_COPY] = ArrayRecord(model)
    context.state[_COPY_ROUND] = ConfigRecord({"round": protocol.server_round(config)})
    return model


def _delta(
    trained: Model,
    received: Model,
    upload: BFP | None,
    cfg: AppConfig,
    context: Context,
    server_round: int,
    generator: torch.Generator,
) -> Model:
    """``trained - received`` on the upload grid, with this node's error feedback.

    The residual (what rounding dropped, FP32, never sent) is added to the next delta;
    one older than ``feedback-max-age`` rounds is dropped.
    """
    delta = {k: v - received[k] if v.is_floating_point() else v for k, v in trained.items()}
    if upload is None:
        return delta
    residual = _load_residual(context, server_round, cfg.feedback_max_age)
    if cfg.upload_feedback and residual is not None:
        delta = {k: v + residual[k] if k in residual else v for k, v in delta.items()}
    rounded = {
        k: quantize(v, upload, generator) if v.is_floating_point() else v for k, v in delta.items()
    }
    if cfg.upload_feedback:
        dropped = {k: v - rounded[k] for k, v in delta.items() if v.is_floating_point()}
        context.state[_RESIDUAL] = ArrayRecord(dropped)
        context.state[_RESIDUAL_ROUND] = ConfigRecord({"round": server_round})
    return rounded


def _load_residual(context: Context, server_round: int, max_age: int) -> Model | None:
    """This node's upload residual, unless it has none or it is too old."""
    if _RESIDUAL not in context.state.array_records:
        return None
    saved_round = context.state[_RESIDUAL_ROUND]["round"]
    if max_age and server_round - int(saved_round) > max_age:
        return None
    return dict(context.state[_RESIDUAL].to_torch_state_dict())


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
