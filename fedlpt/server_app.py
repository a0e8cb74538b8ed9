"""fedlpt ServerApp: compose the strategy wrappers, run the rounds, evaluate, keep results.

The strategy is composed from the run config the way Flower composes its DP wrappers::

    TrafficMeter(CodecStrategy(ServerEMA(<Flower strategy>)))

and driven round by round by :func:`run_rounds` (Flower's ``Strategy.start`` loop,
with a hook after each round so that results are kept as the run goes).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .config import AppConfig
from .data import load_centralized_test
from .quant import BFP
from .results import RunRecorder
from .strategy.codec import CodecStrategy
from .strategy.ema import ServerEMA
from .strategy.registry import build_strategy
from .strategy.traffic import TrafficMeter
from .task import build_model, resolve_device
from .task import evaluate as evaluate_model

app = ServerApp()


@dataclass(frozen=True)
class RoundOutcome:
    """What one round produced: the new global model and the aggregated metrics."""

    server_round: int
    arrays: ArrayRecord
    train_metrics: MetricRecord | None
    evaluate_metrics: MetricRecord | None


@dataclass
class RunOutcome:
    """What a run produced: the final model, the strategy chain, the recorder."""

    arrays: ArrayRecord
    strategy: TrafficMeter
    recorder: RunRecorder


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train ``num-server-rounds`` rounds and write the results folder."""
    run_server(grid, context.run_config, write_results=True)


def compose_strategy(cfg: AppConfig, inner: Strategy) -> TrafficMeter:
    """The wrapper chain a run config asks for, around the Flower strategy ``inner``."""
    strategy: Strategy = inner
    if cfg.ema:
        strategy = ServerEMA(
            strategy, decay=cfg.ema_decay, start=cfg.ema_start, warmup=cfg.ema_warmup
        )
    upload = _format(cfg.bits, cfg)
    downlink = _format(cfg.downlink_bits, cfg)
    return TrafficMeter(CodecStrategy(strategy, upload=upload, downlink=downlink))


def run_server(
    grid: Grid, run_config: Mapping[str, Any], *, write_results: bool = True
) -> RunOutcome:
    """The ServerApp's work on any Grid: strategy, rounds, centralized evaluation, results."""
    cfg = AppConfig.from_run_config(run_config)
    strategy = compose_strategy(cfg, build_strategy(cfg.strategy, cfg.strategy_params))
    device = resolve_device(cfg.device)
    testloader = load_centralized_test(
        cfg.dataset,
        batch_size=256,
        data_dir=cfg.data_dir or None,
        max_examples=cfg.test_examples or None,
    )
    recorder = RunRecorder(cfg, run_config, write=write_results)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> tuple[float, float]:
        model = build_model(cfg.dataset, cfg.model)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy, _ = evaluate_model(model.to(device), testloader)
        return accuracy, loss

    def after_round(outcome: RoundOutcome) -> None:
        accuracy, loss = evaluate_global(outcome.server_round, outcome.arrays)
        recorder.record_round(
            outcome.server_round,
            accuracy,
            loss,
            traffic=strategy.traffic.get(outcome.server_round),
            dropped=strategy.dropped(outcome.server_round),
            train_metrics=outcome.train_metrics,
        )
        log(
            INFO,
            "fedlpt round %s/%s: accuracy %.2f %%, loss %.4f, %.2f MB so far",
            outcome.server_round,
            cfg.num_server_rounds,
            100 * accuracy,
            loss,
            recorder.rows[-1]["cumulative-mb"],
        )

    random.seed(cfg.seed)  # Flower samples nodes with Python's random module
    torch.manual_seed(cfg.seed)  # the initial global model
    initial = ArrayRecord(build_model(cfg.dataset, cfg.model).state_dict())
    accuracy, loss = evaluate_global(0, initial)
    recorder.record_round(0, accuracy, loss)
    strategy.summary()
    arrays = run_rounds(
        strategy,
        grid,
        initial,
        first_round=1,
        last_round=cfg.num_server_rounds,
        after_round=after_round,
    )
    recorder.finish(arrays.to_torch_state_dict())
    return RunOutcome(arrays, strategy, recorder)


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    after_round: Callable[[RoundOutcome], None],
    timeout: float = 3600.0,
) -> ArrayRecord:
    """Rounds ``first_round..last_round`` of Flower's train / evaluate loop; the final model.

    Each round: the strategy configures training, the grid delivers it, the strategy
    aggregates (a round whose aggregate is None keeps the model), then the same for
    client-side evaluation; ``after_round`` sees the outcome.
    """
    for server_round in range(first_round, last_round + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=timeout
        )
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=timeout,
        )
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        after_round(RoundOutcome(server_round, arrays, train_metrics, evaluate_metrics))
    return arrays


def _format(bits: int, cfg: AppConfig) -> BFP | None:
    """The BFP format of ``bits`` with the run's block and rounding; None for FP32."""
    if bits == 32:
        return None
    return BFP(bits, cfg.block_kind, cfg.rounding)  # type: ignore[arg-type]
