"""fedlpt ServerApp: compose the strategy wrappers, run the rounds, evaluate, keep results.

The strategy is composed from the run config the way Flower composes its DP wrappers::

    TrafficMeter(CodecStrategy(DeltaSync(ServerEMA(ReplyScreen(<Flower strategy>)))))

(``DeltaSync`` only with delta uploads or a downlink with error feedback, ``ServerEMA``
only with the EMA on).

and driven round by round by :func:`run_rounds` (Flower's ``Strategy.start`` loop,
with a hook after each round so that results are kept as the run goes).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .checkpoint import Checkpoint, CheckpointError
from .config import AppConfig, ConfigError
from .data import DatasetUnavailableError, load_centralized_test
from .quant import BFP
from .quant.entropy import zstd_available
from .results import RunRecorder
from .strategy.codec import CodecStrategy
from .strategy.delta import DeltaSync
from .strategy.ema import ServerEMA
from .strategy.registry import build_strategy
from .strategy.screen import ReplyScreen, RunFailedError
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
    missing: list[int]  # nodes that were sent the train message and did not reply


@dataclass
class RunOutcome:
    """What a run produced: the final model, the strategy chain, the recorder."""

    arrays: ArrayRecord
    strategy: TrafficMeter
    recorder: RunRecorder


# Errors in what the user asked for (a value, a checkpoint, a dataset, nodes that all
# fail): the run ends as failed with one line naming the cause, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DatasetUnavailableError, RunFailedError)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train ``num-server-rounds`` rounds and write the results folder."""
    try:
        run_server(grid, context.run_config, write_results=True, run_id=context.run_id)
    except USER_ERRORS as err:
        log(ERROR, "fedlpt: %s", err)
        logging.getLogger("flwr").addFilter(_WithoutTraceback(err))
        raise


class _WithoutTraceback(logging.Filter):
    """Drop the traceback Flower logs with ``error``: the message above says it all."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.error:
            record.exc_info = None
            record.exc_text = None
        return True


def compose_strategy(cfg: AppConfig, inner: Strategy) -> TrafficMeter:
    """The wrapper chain a run config asks for, around the Flower strategy ``inner``.

    The screen sits right above the aggregating strategy, so that the EMA only ever
    folds in an aggregate the screen accepted.
    """
    strategy: Strategy = ReplyScreen(
        inner,
        max_abs=cfg.max_abs_weight,
        weighting=cfg.aggregation_weights,
        max_weight_ratio=cfg.max_weight_ratio,
        max_failed_rounds=cfg.max_failed_rounds,
    )
    if cfg.ema:
        strategy = ServerEMA(
            strategy, decay=cfg.ema_decay, start=cfg.ema_start, warmup=cfg.ema_warmup
        )
    upload = _format(cfg.upload_bits_of(), cfg.upload_block_kind, cfg.upload_rounding_kind)
    downlink = _format(cfg.downlink_bits, cfg.downlink_block_kind, cfg.rounding)
    downlink_feedback = downlink is not None and cfg.downlink_feedback
    if cfg.upload == "delta" or downlink_feedback:
        strategy = DeltaSync(
            strategy,
            delta_uploads=cfg.upload == "delta",
            downlink=downlink if downlink_feedback else None,
        )
    return TrafficMeter(CodecStrategy(strategy, upload=upload, downlink=downlink))


def run_server(
    grid: Grid,
    run_config: Mapping[str, Any],
    *,
    write_results: bool = True,
    run_id: int | None = None,
) -> RunOutcome:
    """The ServerApp's work on any Grid: strategy, rounds, centralized evaluation, results.

    With ``write_results`` the run folder is kept up to date after every round, a
    checkpoint included, and ``resume-from`` can continue a run from it.
    """
    cfg = AppConfig.from_run_config(run_config)
    if cfg.compress == "zstd" and not zstd_available():
        raise ConfigError(
            'compress = "zstd" needs the zstandard library on the server: '
            'pip install "fedlpt[compress]" (or "fedlpt[server]")'
        )
    strategy = compose_strategy(cfg, build_strategy(cfg.strategy, cfg.strategy_params))
    checkpoint = _checkpoint_to_resume(cfg, run_config)
    device = resolve_device(cfg.device)
    testloader = load_centralized_test(
        cfg.dataset,
        batch_size=256,
        data_dir=cfg.data_dir or None,
        max_examples=cfg.test_examples or None,
    )
    folder = Path(cfg.resume_from).expanduser().resolve() if checkpoint else None
    recorder = RunRecorder(
        cfg,
        run_config,
        folder=folder,
        write=write_results,
        run_id=run_id,
        clients=len(list(grid.get_node_ids())),
    )

    def evaluate_global(arrays: ArrayRecord) -> tuple[float, float]:
        model = build_model(cfg.dataset, cfg.model)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy, _ = evaluate_model(model.to(device), testloader)
        return accuracy, loss

    def after_round(outcome: RoundOutcome) -> None:
        accuracy, loss = evaluate_global(outcome.arrays)
        recorder.record_round(
            outcome.server_round,
            accuracy,
            loss,
            traffic=strategy.traffic.get(outcome.server_round),
            dropped=strategy.dropped(outcome.server_round),
            train_metrics=outcome.train_metrics,
            missing=len(outcome.missing),
            node_bits=strategy.find(CodecStrategy).node_bits(outcome.server_round),
        )
        if write_results:
            Checkpoint.capture(
                outcome.server_round,
                outcome.arrays.to_torch_state_dict(),
                strategy.state_dict(),
                recorder.state_dict(),
                dict(run_config),
            ).save(recorder.folder)
        log(INFO, recorder.progress_line())

    if checkpoint is None:
        random.seed(cfg.seed)  # Flower samples nodes with Python's random module
        torch.manual_seed(cfg.seed)  # the initial global model
        arrays = ArrayRecord(build_model(cfg.dataset, cfg.model).state_dict())
        accuracy, loss = evaluate_global(arrays)
        recorder.record_round(0, accuracy, loss)
        first_round = 1
    else:
        strategy.load_state_dict(checkpoint.strategy)
        recorder.load_state_dict(checkpoint.results)
        checkpoint.restore_random()
        arrays = ArrayRecord(checkpoint.model)
        first_round = checkpoint.server_round + 1
        log(INFO, "fedlpt: resuming %s after round %s", recorder.folder, checkpoint.server_round)
    strategy.summary()
    arrays = run_rounds(
        strategy,
        grid,
        arrays,
        first_round=first_round,
        last_round=cfg.num_server_rounds,
        after_round=after_round,
        timeout=cfg.round_timeout,
    )
    recorder.finish(arrays.to_torch_state_dict())
    return RunOutcome(arrays, strategy, recorder)


def _checkpoint_to_resume(cfg: AppConfig, run_config: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint ``resume-from`` names, checked against this run config."""
    if not cfg.resume_from:
        return None
    checkpoint = Checkpoint.load(Path(cfg.resume_from))
    checkpoint.check_continues(dict(run_config))
    return checkpoint


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

    Each round: the strategy configures training, the grid delivers it and waits up to
    ``timeout`` seconds for the replies (nodes that did not answer are logged), the
    strategy aggregates (a round whose aggregate is None keeps the model), then the same
    for client-side evaluation; ``after_round`` sees the outcome.
    """
    for server_round in range(first_round, last_round + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        missing = _missing(server_round, messages, replies, timeout)
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        _missing(server_round, messages, replies, timeout)
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        after_round(RoundOutcome(server_round, arrays, train_metrics, evaluate_metrics, missing))
    return arrays


def _missing(
    server_round: int, messages: list[Message], replies: list[Message], timeout: float
) -> list[int]:
    """Nodes sent a message that did not reply in time; logged with their ids."""
    answered = {reply.metadata.src_node_id for reply in replies}
    missing = sorted({m.metadata.dst_node_id for m in messages} - answered)
    if missing:
        log(
            WARNING,
            "Round %s: no reply within %g s from node(s) %s; going on without them",
            server_round,
            timeout,
            missing,
        )
    return missing


def _format(bits: int, block: str | int, rounding: str) -> BFP | None:
    """The BFP format of ``bits``, ``block`` and ``rounding``; None for FP32."""
    if bits == 32:
        return None
    return BFP(bits, block, rounding)  # type: ignore[arg-type]
