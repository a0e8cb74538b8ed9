"""fedlpt ServerApp: run the quantized strategy, evaluate the global (EMA) model, write results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from .config import AppConfig
from .data import load_centralized_test
from .quant.wire import to_state_dict
from .results import RunRecorder
from .strategy import QuantizedStrategy, build_strategy
from .task import evaluate as evaluate_model

app = ServerApp()


@dataclass
class RunOutcome:
    """What a run produced: Flower's Result, the strategy (with its traffic), the recorder."""

    result: Result
    strategy: QuantizedStrategy
    recorder: RunRecorder


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train ``num-server-rounds`` rounds and write the results folder."""
    run_server(grid, context.run_config, write_results=True)


def run_server(
    grid: Grid, run_config: Mapping[str, Any], *, write_results: bool = True
) -> RunOutcome:
    """The ServerApp's work on any Grid: strategy, centralized evaluation, results."""
    cfg = AppConfig.from_run_config(run_config)
    strategy = QuantizedStrategy(
        build_strategy(cfg.strategy, cfg.strategy_params),
        upload=cfg.upload_format(),
        downlink=cfg.downlink_format(),
        ema_decay=cfg.ema_decay if cfg.ema else None,
        ema_start=cfg.ema_start,
    )
    recorder = RunRecorder(cfg, dict(run_config))
    testloader = load_centralized_test(cfg.dataset, batch_size=256, data_dir=cfg.data_dir)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = cfg.build_model()
        model.load_state_dict(to_state_dict(arrays))
        loss, accuracy, _ = evaluate_model(model, testloader)
        recorder.record_round(server_round, accuracy, loss, strategy.traffic.get(server_round))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    torch.manual_seed(cfg.seed)  # the initial global model
    initial = cfg.build_model()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial.state_dict()),
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs}),
        evaluate_fn=evaluate_global,
    )
    if write_results:
        final = cfg.build_model()
        final.load_state_dict(to_state_dict(result.arrays))
        recorder.finish(final.state_dict(), result.train_metrics_clientapp)
    return RunOutcome(result, strategy, recorder)
