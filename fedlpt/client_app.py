"""fedlpt ClientApp: train locally in low precision, reply with a bit-packed model."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import AppConfig, node_bits, node_partition
from .data import load_partition
from .quant import LowPrecision
from .quant.wire import encode_arrays, serialized_size, to_state_dict
from .strategy import CONFIG_BITS, CONFIG_BLOCK, CONFIG_ROUNDING
from .task import evaluate as evaluate_model
from .task import train as train_model

app = ClientApp()

_OPTIMIZER_KEY = "fedlpt.optimizer"  # context.state: this node's optimizer state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Decode the global model, train it on this node's data, reply bit-packed."""
    cfg = AppConfig.from_run_config(context.run_config)
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))
    partition_id, num_partitions = node_partition(context.node_config)
    bits = node_bits(context.node_config, default=int(config.get(CONFIG_BITS, cfg.bits)))
    block = config.get(CONFIG_BLOCK, cfg.block)
    rounding = str(config.get(CONFIG_ROUNDING, cfg.rounding))
    block = int(block) if str(block).isdigit() else str(block)

    model = _model_from(msg, cfg)
    trainloader, _ = _loaders(cfg, partition_id, num_partitions, server_round)
    recipe = LowPrecision.uniform(
        bits,
        block=block,
        rounding=rounding,
        quantize_optimizer_state=cfg.quantize_optimizer_state,
    )
    start = time.perf_counter()
    result, optimizer_state = train_model(
        model,
        trainloader,
        recipe=recipe,
        epochs=cfg.local_epochs,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=_seed(cfg.seed, server_round, partition_id),
        optimizer_state=_load_optimizer_state(context),
    )
    train_seconds = time.perf_counter() - start
    _save_optimizer_state(context, optimizer_state)

    state = model.state_dict()
    if recipe.weight is None:
        arrays = ArrayRecord(state)
    else:  # the weights already sit on this grid: only buffers, if any, are rounded here
        generator = torch.Generator().manual_seed(_seed(cfg.seed, server_round, partition_id))
        arrays = encode_arrays(state, recipe.weight, generator)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "payload-bytes": serialized_size(arrays),
            "bits": bits,
            "train-seconds": train_seconds,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model (full precision) on this node's test split."""
    cfg = AppConfig.from_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context.node_config)
    model = _model_from(msg, cfg)
    _, testloader = _loaders(cfg, partition_id, num_partitions, server_round=0)
    loss, accuracy, examples = evaluate_model(model, testloader)
    if not examples:  # every node must reply with the same keys; weight 0 hides these
        loss, accuracy = 0.0, 0.0
    metrics = MetricRecord({"num-examples": examples, "eval-loss": loss, "eval-acc": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _loaders(cfg: AppConfig, partition_id: int, num_partitions: int, server_round: int):
    """This node's train/test loaders; the train order is reshuffled every round."""
    return load_partition(
        cfg.dataset,
        partition_id,
        num_partitions,
        alpha=cfg.alpha,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        data_dir=cfg.data_dir,
        shuffle_seed=_seed(cfg.seed, server_round, partition_id),
    )


def _model_from(msg: Message, cfg: AppConfig) -> torch.nn.Module:
    model = cfg.build_model()
    model.load_state_dict(to_state_dict(msg.content["arrays"]))
    return model


def _seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, partition)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


def _save_optimizer_state(context: Context, state: dict) -> None:
    """Keep the optimizer's tensors in the node's persistent state (FP32, never sent)."""
    tensors = {
        f"{index}/{name}": value
        for index, entries in state["state"].items()
        for name, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    context.state[_OPTIMIZER_KEY] = ArrayRecord(tensors)


def _load_optimizer_state(context: Context) -> dict | None:
    if _OPTIMIZER_KEY not in context.state.array_records:
        return None
    flat = context.state[_OPTIMIZER_KEY].to_torch_state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split("/", 1)
        per_param.setdefault(int(index), {})[name] = value
    return {"state": per_param}
