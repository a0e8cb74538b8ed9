"""Figures of runs: test accuracy against rounds and against megabytes sent.

One function draws any number of runs into one figure, for a run's own folder and for
``python -m fedlpt.compare``. Figures are saved as PNG at print resolution (300 dpi), SVG
and PDF; the accuracy axis is in percent over a fixed 0-100 range, so curves from
different runs and papers read alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("png", "svg", "pdf")


@dataclass(frozen=True)
class Curve:
    """One run's accuracy per round, with the cumulative megabytes sent after each round."""

    label: str
    rounds: Sequence[int]
    accuracy: Sequence[float]  # in [0, 1]
    megabytes: Sequence[float]

    @classmethod
    def from_report(cls, report: Mapping[str, Any], label: str | None = None) -> Curve:
        """The curve of a ``results.json`` report (its legend label unless one is given)."""
        rows = report["rounds"]
        return cls(
            label or run_label(report),
            [r["round"] for r in rows],
            [r["accuracy"] for r in rows],
            [r["cumulative-mb"] for r in rows],
        )


def run_label(report: Mapping[str, Any]) -> str:
    """What sets a run apart in a legend: precision, upload, EMA."""
    cfg = report["config"]
    precision = report.get("summary", {}).get("precision") or (
        "FP32" if cfg["bits"] == 32 else f"{cfg['bits']}-bit"
    )
    parts = [precision]
    if cfg.get("downlink_bits", 32) != 32:
        parts.append(f"{cfg['downlink_bits']}-bit down")
    parts.append(f"EMA {cfg['ema_decay']}" if cfg["ema"] else "no EMA")
    return ", ".join(parts)


def run_title(report: Mapping[str, Any]) -> str:
    """What a group of comparable runs shares: data, model, strategy, skew, clients."""
    cfg = report["config"]
    skew = "IID" if cfg.get("partitioner") == "iid" else f"alpha {cfg['alpha']:g}"
    clients = report.get("run", {}).get("clients")
    who = f", {clients} clients" if clients else ""
    return f"{cfg['dataset']}, {cfg['model']}, {cfg['strategy']}, {skew}{who}"


def accuracy_figure(curves: Sequence[Curve], title: str) -> Any:
    """A figure of two panels: accuracy vs round, and vs cumulative MB sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_mb) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for curve in curves:
        accuracy = [100 * a for a in curve.accuracy]
        marker = "o" if len(curve.rounds) <= 30 else None
        by_round.plot(curve.rounds, accuracy, marker=marker, markersize=3, label=curve.label)
        by_mb.plot(curve.megabytes, accuracy, marker=marker, markersize=3, label=curve.label)
    by_round.set_xlabel("round")
    by_mb.set_xlabel("cumulative MB sent (up + down)")
    by_round.set_ylabel("test accuracy (%)")
    for axis in (by_round, by_mb):
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    by_mb.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """Save ``fig`` as ``stem.png`` (300 dpi), ``stem.svg`` and ``stem.pdf``; close it."""
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in FORMATS:
        path = stem.with_suffix(f".{suffix}")
        fig.savefig(path, dpi=300 if suffix == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths
