"""The results folder of a run: results.json, metrics.csv, plots, the final model, a summary.

:class:`RunRecorder` writes ``results.json`` and ``metrics.csv`` after every round
(atomically: write, then rename), so that a run that stops early leaves what it did;
the figure (``accuracy.png``/``.svg``/``.pdf``) is redrawn at most every
:data:`PLOT_EVERY_S` seconds and at the end.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import AppConfig
from .figures import Curve, accuracy_figure, run_title, save_figure
from .strategy.base import DroppedReply
from .strategy.traffic import RoundTraffic

MB = 1e6
RESULTS_DIR_ENV = "FEDLPT_RESULTS_DIR"  # overrides results-dir (e.g. for a SuperLink host)
PLOT_EVERY_S = 30.0


def results_root(cfg: AppConfig) -> Path:
    """Where run folders go: $FEDLPT_RESULTS_DIR, else ``results-dir`` (relative to CWD)."""
    return Path(os.environ.get(RESULTS_DIR_ENV) or cfg.results_dir).expanduser().resolve()


def run_metadata(run_id: int | None, clients: int | None) -> dict[str, Any]:
    """Who made the results: the run, the number of clients, versions and the git commit."""
    versions = {}
    for package in ("fedlpt", "flwr", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "run-id": run_id,
        "clients": clients,
        "versions": versions,
        "git-commit": _git_commit(Path(__file__).resolve().parent.parent),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit(folder: Path) -> str | None:
    """The commit of the checkout fedlpt runs from, if it is one (a FAB is not)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _duration(seconds: float) -> str:
    """``75`` as ``1m15s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _unused(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``...: the first that did not exist, now made."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = folder if attempt == 1 else folder.with_name(f"{folder.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run folder name beside {folder}")


class RunRecorder:
    """Collects per-round figures and keeps the run folder up to date.

    Args:
        cfg: the run's parsed configuration.
        run_config: the run config as Flower passed it (recorded verbatim).
        folder: the run folder; by default
            ``<results root>/<time>-<dataset>-<model>-<bits>-<strategy>``.
        write: whether to write files at all (benchmarks and tests may only collect).
    """

    def __init__(
        self,
        cfg: AppConfig,
        run_config: Mapping[str, Any],
        *,
        folder: Path | None = None,
        write: bool = True,
        run_id: int | None = None,
        clients: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_config = dict(run_config)
        if folder is None and cfg.run_name:
            folder = results_root(cfg) / cfg.run_name
            if write and (folder / "results.json").exists():
                raise FileExistsError(
                    f"run folder {folder} holds a run already: continue it with "
                    f"resume-from = {str(folder)!r}, or choose another run-name"
                )
        elif folder is None:
            bits = "fp32" if cfg.bits == 32 else f"{cfg.bits}bit"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{stamp}-{cfg.dataset}-{cfg.model}-{bits}-{cfg.strategy}"
            folder = _unused(results_root(cfg) / name) if write else results_root(cfg) / name
        self.folder = folder
        self.write = write
        self.run = run_metadata(run_id, clients)
        self.rows: list[dict[str, Any]] = []
        self.nodes: dict[int, dict[str, Any]] = {}  # per node: rounds, bits, bytes up
        self.dropped: dict[int, list[str]] = {}
        self.train_metrics: dict[int, dict[str, Any]] = {}
        self.started = time.perf_counter()
        self._resumed_at = 0.0  # elapsed-s of the round this process started from
        self._plotted_at = float("-inf")

    def record_round(
        self,
        server_round: int,
        accuracy: float,
        loss: float,
        traffic: RoundTraffic | None = None,
        dropped: list[DroppedReply] | None = None,
        train_metrics: Mapping[str, Any] | None = None,
        missing: int = 0,
        node_bits: Mapping[int, int] | None = None,
    ) -> None:
        """Add one round's evaluation, traffic and replies (round 0: the start); save.

        ``node_bits`` maps each node whose upload was accepted to its word length.
        """
        traffic = traffic or RoundTraffic(server_round)
        dropped = dropped or []
        previous = self.rows[-1]["cumulative-mb"] if self.rows else 0.0
        train_metrics = dict(train_metrics or {})
        self.rows.append(
            {
                "round": server_round,
                "accuracy": accuracy,
                "loss": loss,
                "train-loss": train_metrics.get("train-loss"),  # None (null) at round 0
                "bytes-up": traffic.bytes_up,
                "bytes-down": traffic.bytes_down,
                "bytes-down-eval": traffic.bytes_down_eval,
                "bytes-up-eval": traffic.bytes_up_eval,
                "replies": traffic.replies,
                "replies-dropped": len(dropped),
                "replies-missing": missing,
                "cumulative-mb": previous + traffic.total / MB,
                "elapsed-s": time.perf_counter() - self.started,
            }
        )
        for node, bits in (node_bits or {}).items():
            entry = self.nodes.setdefault(node, {"rounds": 0, "bits": [], "bytes-up": 0})
            entry["rounds"] += 1
            entry["bits"] = sorted({*entry["bits"], bits})
        for node, size in traffic.up_by_node.items():
            entry = self.nodes.setdefault(node, {"rounds": 0, "bits": [], "bytes-up": 0})
            entry["bytes-up"] += size
        if dropped:
            self.dropped[server_round] = [str(d) for d in dropped]
        if train_metrics:
            self.train_metrics[server_round] = train_metrics
        if self.write:
            self.save()
            if time.perf_counter() - self._plotted_at >= PLOT_EVERY_S:
                self.plot()

    def state_dict(self) -> dict[str, Any]:
        """What the recorder has collected, for a checkpoint."""
        return {
            "rows": self.rows,
            "nodes": {str(k): v for k, v in self.nodes.items()},
            "dropped": {str(k): v for k, v in self.dropped.items()},
            "train_metrics": {str(k): v for k, v in self.train_metrics.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's rounds; elapsed time goes on from the last row."""
        self.rows = [dict(r) for r in state["rows"]]
        self.nodes = {int(k): dict(v) for k, v in state["nodes"].items()}
        self.dropped = {int(k): list(v) for k, v in state["dropped"].items()}
        self.train_metrics = {int(k): dict(v) for k, v in state["train_metrics"].items()}
        if self.rows:
            self.started = time.perf_counter() - self.rows[-1]["elapsed-s"]
            self._resumed_at = self.rows[-1]["elapsed-s"]

    def report(self) -> dict[str, Any]:
        """Everything results.json holds."""
        return {
            "run": self.run,
            "config": asdict(self.cfg),
            "run-config": self.run_config,
            "summary": self.summary(),
            "nodes": {str(k): v for k, v in sorted(self.nodes.items())},
            "rounds": self.rows,
            "dropped": {str(k): v for k, v in self.dropped.items()},
            "train-metrics": {str(k): v for k, v in self.train_metrics.items()},
        }

    def save(self) -> None:
        """Write results.json and metrics.csv as they stand."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.report(), indent=2, default=str)
        write_atomically(self.folder / "results.json", text.encode())
        if self.rows:
            table = io.StringIO()
            writer = csv.DictWriter(table, fieldnames=list(self.rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            write_atomically(self.folder / "metrics.csv", table.getvalue().encode())

    def finish(self, final_state: Mapping[str, Tensor]) -> Path:
        """Write everything with the final model, print a summary, and return the folder."""
        if self.write:
            self.save()
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in final_state.items()}, buffer)
            write_atomically(self.folder / "model.pt", buffer.getvalue())
            self.plot()
        print(self.summary_text(), flush=True)
        return self.folder

    def summary(self) -> dict[str, Any]:
        """The run's headline figures."""
        trained = [r for r in self.rows if r["round"] > 0]
        last = trained[-5:] if trained else self.rows[-1:]
        rounds = max(len(trained), 1)
        return {
            "rounds": len(trained),
            "final-accuracy": self.rows[-1]["accuracy"] if self.rows else float("nan"),
            "mean-accuracy-last-5": sum(r["accuracy"] for r in last) / max(len(last), 1),
            "mean-bytes-up-per-round": sum(r["bytes-up"] for r in trained) / rounds,
            "mean-bytes-down-per-round": sum(r["bytes-down"] for r in trained) / rounds,
            "replies-dropped": sum(r["replies-dropped"] for r in trained),
            "precision": self.precision(),
            "total-mb": self.rows[-1]["cumulative-mb"] if self.rows else 0.0,
            "seconds": time.perf_counter() - self.started,
            "folder": str(self.folder),
        }

    def precision(self) -> str:
        """The word lengths the nodes uploaded in: "8-bit", or "mixed: 8-bit x2, 4-bit x1"."""
        widths = Counter(max(n["bits"]) for n in self.nodes.values() if n["bits"])
        if not widths:
            return "FP32" if self.cfg.bits == 32 else f"{self.cfg.bits}-bit"
        names = {b: "FP32" if b == 32 else f"{b}-bit" for b in widths}
        if len(widths) == 1:
            return names[next(iter(widths))]
        listed = ", ".join(f"{names[b]} x{n}" for b, n in sorted(widths.items(), reverse=True))
        return f"mixed: {listed}"

    def progress_line(self) -> str:
        """One line on the latest round: accuracy, traffic, pace and time left."""
        row = self.rows[-1]
        done = row["round"] - self.rows[0]["round"]
        left = self.cfg.num_server_rounds - row["round"]
        pace = (row["elapsed-s"] - self._resumed_at) / done if done else float("nan")
        eta = _duration(pace * left) if done else "?"
        return (
            f"fedlpt round {row['round']}/{self.cfg.num_server_rounds}: accuracy "
            f"{100 * row['accuracy']:.2f} % (loss {row['loss']:.4f}), up "
            f"{row['bytes-up'] / MB:.2f} MB / down {row['bytes-down'] / MB:.2f} MB, "
            f"{row['cumulative-mb']:.1f} MB so far, {pace:.1f} s/round, ETA {eta}"
        )

    def summary_text(self) -> str:
        """The summary printed at the end of a run."""
        s, cfg = self.summary(), self.cfg
        precision = (
            "FP32" if cfg.bits == 32 else f"{cfg.bits}-bit BFP ({cfg.block}, {cfg.rounding})"
        )
        ema = f"EMA {cfg.ema_decay}" if cfg.ema else "no EMA"
        return "\n".join(
            [
                "",
                f"fedlpt: {cfg.dataset} / {cfg.model} / {cfg.strategy}, {precision}, {ema}",
                f"  nodes             {len(self.nodes)} ({s['precision']})",
                f"  rounds            {s['rounds']}",
                f"  final accuracy    {100 * s['final-accuracy']:.2f} %",
                f"  last-5 accuracy   {100 * s['mean-accuracy-last-5']:.2f} %",
                f"  upload per round  {s['mean-bytes-up-per-round'] / MB:.3f} MB",
                f"  download / round  {s['mean-bytes-down-per-round'] / MB:.3f} MB",
                f"  total traffic     {s['total-mb']:.3f} MB",
                f"  replies dropped   {s['replies-dropped']}",
                f"  wall time         {s['seconds']:.1f} s",
                f"  results           {s['folder'] if self.write else '(not written)'}",
                "",
            ]
        )

    def plot(self) -> None:
        """Draw accuracy vs round and vs MB into ``accuracy.{png,svg,pdf}`` of the folder."""
        if not self.rows:
            return
        report = self.report()
        figure = accuracy_figure([Curve.from_report(report)], run_title(report))
        save_figure(figure, self.folder / "accuracy")
        self._plotted_at = time.perf_counter()
