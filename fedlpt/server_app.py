"""fedlpt ServerApp: run the quantized strategy, evaluate the global (EMA) model, write results."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .config import AppConfig
from .data import load_centralized_test
from .quant import to_state_dict
from .results import RunRecorder
from .strategy import QuantizedStrategy, build_strategy
from .task import evaluate as evaluate_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train ``num-server-rounds`` rounds and write the results folder."""
    cfg = AppConfig.from_run_config(context.run_config)
    strategy = QuantizedStrategy(
        build_strategy(cfg.strategy, cfg.strategy_params),
        upload=cfg.upload_format(),
        downlink=cfg.downlink_format(),
        ema_decay=cfg.ema_decay if cfg.ema else None,
        ema_start=cfg.ema_start,
    )
    recorder = RunRecorder(cfg, dict(context.run_config))
    testloader = load_centralized_test(cfg.dataset, batch_size=256, data_dir=cfg.data_dir)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = cfg.build_model()
        model.load_state_dict(to_state_dict(arrays))
        loss, accuracy, _ = evaluate_model(model, testloader)
        recorder.record_round(server_round, accuracy, loss, strategy.traffic.get(server_round))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    initial = cfg.build_model()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial.state_dict()),
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs}),
        evaluate_fn=evaluate_global,
    )
    final = cfg.build_model()
    final.load_state_dict(to_state_dict(result.arrays))
    recorder.finish(final.state_dict(), result.train_metrics_clientapp)
