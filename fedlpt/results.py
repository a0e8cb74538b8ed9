"""The results folder of a run: results.json, metrics.csv, plots, the final model, a summary."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import AppConfig
from .strategy import RoundTraffic

MB = 1e6
RESULTS_DIR_ENV = "FEDLPT_RESULTS_DIR"  # overrides results-dir (e.g. for a SuperLink host)


def results_root(cfg: AppConfig) -> Path:
    """Where run folders go: $FEDLPT_RESULTS_DIR, else ``results-dir`` (relative to CWD)."""
    return Path(os.environ.get(RESULTS_DIR_ENV) or cfg.results_dir).expanduser().resolve()


class RunRecorder:
    """Collects per-round figures during a run and writes them out at the end."""

    def __init__(self, cfg: AppConfig, run_config: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.run_config = dict(run_config)
        bits = "fp32" if cfg.bits == 32 else f"{cfg.bits}bit"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{cfg.dataset}-{cfg.model}-{bits}-{cfg.strategy}"
        self.folder = results_root(cfg) / name
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def record_round(
        self, server_round: int, accuracy: float, loss: float, traffic: RoundTraffic | None
    ) -> None:
        """Add the centralized evaluation and traffic of one round (round 0: the start)."""
        traffic = traffic or RoundTraffic(server_round)
        previous = self.rows[-1]["cumulative-mb"] if self.rows else 0.0
        sent = (
            traffic.bytes_up + traffic.bytes_down + traffic.bytes_up_eval + traffic.bytes_down_eval
        )
        self.rows.append(
            {
                "round": server_round,
                "accuracy": accuracy,
                "loss": loss,
                "bytes-up": traffic.bytes_up,
                "bytes-down": traffic.bytes_down,
                "bytes-down-eval": traffic.bytes_down_eval,
                "bytes-up-eval": traffic.bytes_up_eval,
                "replies": traffic.replies,
                "replies-dropped": len(traffic.dropped),
                "cumulative-mb": previous + sent / MB,
                "elapsed-s": time.perf_counter() - self.started,
            }
        )

    def finish(self, final_state: Mapping[str, Tensor], train_metrics: Mapping[int, Any]) -> Path:
        """Write everything, print a summary, and return the folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(dict(final_state), self.folder / "model.pt")
        summary = self._summary()
        payload = {
            "config": asdict(self.cfg),
            "run-config": self.run_config,
            "summary": summary,
            "rounds": self.rows,
            "train-metrics": {str(k): dict(v) for k, v in train_metrics.items()},
        }
        (self.folder / "results.json").write_text(json.dumps(payload, indent=2, default=str))
        if self.rows:
            with open(self.folder / "metrics.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)
            self._plot()
        print(self._summary_text(summary), flush=True)
        return self.folder

    def _summary(self) -> dict[str, Any]:
        trained = [r for r in self.rows if r["round"] > 0]
        last = trained[-5:] if trained else self.rows[-1:]
        rounds = max(len(trained), 1)
        return {
            "rounds": len(trained),
            "final-accuracy": self.rows[-1]["accuracy"] if self.rows else float("nan"),
            "mean-accuracy-last-5": sum(r["accuracy"] for r in last) / max(len(last), 1),
            "mean-bytes-up-per-round": sum(r["bytes-up"] for r in trained) / rounds,
            "mean-bytes-down-per-round": sum(r["bytes-down"] for r in trained) / rounds,
            "total-mb": self.rows[-1]["cumulative-mb"] if self.rows else 0.0,
            "seconds": time.perf_counter() - self.started,
            "folder": str(self.folder),
        }

    def _summary_text(self, s: dict[str, Any]) -> str:
        cfg = self.cfg
        precision = (
            "FP32" if cfg.bits == 32 else f"{cfg.bits}-bit BFP ({cfg.block}, {cfg.rounding})"
        )
        ema = f"EMA {cfg.ema_decay}" if cfg.ema else "no EMA"
        return "\n".join(
            [
                "",
                f"fedlpt: {cfg.dataset} / {cfg.model} / {cfg.strategy}, {precision}, {ema}",
                f"  rounds            {s['rounds']}",
                f"  final accuracy    {100 * s['final-accuracy']:.2f} %",
                f"  last-5 accuracy   {100 * s['mean-accuracy-last-5']:.2f} %",
                f"  upload per round  {s['mean-bytes-up-per-round'] / MB:.3f} MB",
                f"  download / round  {s['mean-bytes-down-per-round'] / MB:.3f} MB",
                f"  total traffic     {s['total-mb']:.3f} MB",
                f"  wall time         {s['seconds']:.1f} s",
                f"  results           {s['folder']}",
                "",
            ]
        )

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rows]
        accuracy = [100 * r["accuracy"] for r in self.rows]
        megabytes = [r["cumulative-mb"] for r in self.rows]
        label = "FP32" if self.cfg.bits == 32 else f"{self.cfg.bits}-bit"
        for x, xlabel, filename in (
            (rounds, "round", "accuracy.png"),
            (megabytes, "cumulative MB sent (up + down)", "accuracy_vs_mb.png"),
        ):
            fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
            ax.plot(x, accuracy, marker="o", markersize=3, label=label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{self.cfg.dataset}, {self.cfg.strategy}")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.folder / filename)
            plt.close(fig)
