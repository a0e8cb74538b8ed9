"""Compare runs: one figure of accuracy vs round and vs MB, and a table.

    python -m fedlpt.compare results/RUN_A results/RUN_B [...] [--out compare] [--labels ...]

Each argument is a run folder (or its ``results.json``). The figure goes to
``OUT.png`` / ``.svg`` / ``.pdf``; the table (final and last-5 accuracy, upload per round,
total MB) is printed. Runs that are still going, or stopped early, compare as far as
they went.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .figures import Curve, accuracy_figure, run_title, save_figure

MB = 1e6


def read_report(path: Path) -> dict[str, Any]:
    """The ``results.json`` of a run folder (or the file itself)."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no results.json (is it a fedlpt run folder?)")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(report, dict) or not report.get("rounds") or "config" not in report:
        raise ValueError(f"{file}: not a fedlpt results.json (no rounds or config)")
    return report


def table(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[list[str]]:
    """Rows of the printed table: one per run."""
    rows = [["run", "rounds", "final %", "last-5 %", "up MB/round", "total MB"]]
    for report, label in zip(reports, labels, strict=True):
        summary = report["summary"]
        rows.append(
            [
                label,
                str(summary["rounds"]),
                f"{100 * summary['final-accuracy']:.2f}",
                f"{100 * summary['mean-accuracy-last-5']:.2f}",
                f"{summary['mean-bytes-up-per-round'] / MB:.3f}",
                f"{summary['total-mb']:.1f}",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Draw and print the comparison; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or results.json files")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="figure path stem")
    parser.add_argument("--labels", nargs="*", help="legend labels, one per run")
    parser.add_argument("--title", help="figure title (default: what the runs share)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    try:
        reports = [read_report(path) for path in args.runs]
    except (OSError, ValueError) as err:
        print(f"fedlpt.compare: {err}", file=sys.stderr)
        return 2
    curves = [
        Curve.from_report(r, args.labels[i] if args.labels else None) for i, r in enumerate(reports)
    ]
    labels = [c.label for c in curves]
    if len(set(labels)) < len(labels):  # same settings: tell the runs apart by folder
        labels = [f"{c.label} ({p.name})" for c, p in zip(curves, args.runs, strict=True)]
        curves = [
            Curve(lab, c.rounds, c.accuracy, c.megabytes)
            for c, lab in zip(curves, labels, strict=True)
        ]
    titles = {run_title(r) for r in reports}
    title = args.title or (titles.pop() if len(titles) == 1 else "fedlpt runs")
    paths = save_figure(accuracy_figure(curves, title), args.out)
    rows = table(reports, labels)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print("figure: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
