"""Federated benchmark: accuracy and bytes of low-precision FedAvg on digits.

Runs the real ServerApp and ClientApps (``fedlpt.inprocess.simulate``: Flower's message
serialization, no Ray) on scikit-learn's digits, 10 clients, Dirichlet alpha 0.3, for the
grid bits {32, 8, 6, 4} x server EMA {off, on} x 3 seeds. Accuracy is the paper's metric:
the mean centralized test accuracy of the global model over the last 5 rounds. Bytes are
what Flower serializes for transport. Runs go to ``--jobs`` worker processes with one torch
thread each, so two cores run two federations side by side.

    python -m bench.federated [--quick] [--rounds N] [--jobs J]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench._common import print_json, print_table

SEEDS = (0, 1, 2)
GRID = [(bits, ema) for bits in (32, 8, 6, 4) for ema in (False, True)]
CLIENTS = 10


def run_one(job: dict) -> dict:
    """One federation in this (worker) process; returns its per-round figures."""
    import torch

    from fedlpt.inprocess import simulate

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # after flwr set up its logger

    start = time.perf_counter()
    outcome = simulate(job["run_config"], CLIENTS, write_results=False)
    rows = outcome.recorder.rows
    trained = [r for r in rows if r["round"] > 0]
    return {
        **job,
        "accuracy": [r["accuracy"] for r in rows],
        "last5": statistics.mean(r["accuracy"] for r in trained[-5:]),
        "bytes_up": statistics.mean(r["bytes-up"] for r in trained),
        "bytes_down": statistics.mean(r["bytes-down"] for r in trained),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 rounds (under 5 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 60)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--plot", default="results/bench_federated.png")
    parser.add_argument(
        "--configs",
        default="",
        help="comma-separated subset of the grid, e.g. 'fp32,b8_ema' (default: all eight)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (12 if args.quick else 60)
    grid = [c for c in GRID if not args.configs or _name(*c) in args.configs.split(",")]
    if not any(bits == 32 and not ema for bits, ema in grid) or not any(b == 8 for b, _ in grid):
        parser.error("--configs must include fp32 and an 8-bit configuration")
    base = {"dataset": "digits", "alpha": 0.3, "num-server-rounds": rounds, "batch-size": 32}

    jobs = [
        {
            "bits": bits,
            "ema": ema,
            "seed": seed,
            "run_config": {**base, "bits": bits, "ema": ema, "seed": seed},
        }
        for bits, ema in grid  # only the configs asked for are run
        for seed in SEEDS
    ]
    # Bytes of a round with the downlink quantized too (deterministic: one short run).
    jobs.append(
        {
            "bits": 8,
            "ema": True,
            "seed": 0,
            "downlink": True,
            "run_config": {**base, "bits": 8, "downlink-bits": 8, "num-server-rounds": 2},
        }
    )
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - started

    runs = [r for r in results if not r.get("downlink")]
    downlink_run = next(r for r in results if r.get("downlink"))
    rows, figures, curves = [], {}, {}
    for bits, ema in grid:
        group = [r for r in runs if r["bits"] == bits and r["ema"] == ema]
        accs = [100 * r["last5"] for r in group]
        mean = statistics.mean(accs)
        name = _name(bits, ema)
        figures[f"acc_{name}"] = round(mean, 2)
        curves[name] = [
            statistics.mean(c) for c in zip(*(r["accuracy"] for r in group), strict=True)
        ]
        rows.append(
            [
                "FP32" if bits == 32 else f"{bits}-bit",
                "on" if ema else "off",
                mean,
                statistics.pstdev(accs),
                " ".join(f"{a:.1f}" for a in accs),
                int(group[0]["bytes_up"]),
                int(group[0]["bytes_down"]),
                sum(r["seconds"] for r in group),
            ]
        )
    fp32 = next(r for r in runs if r["bits"] == 32 and not r["ema"])
    b8 = next(r for r in runs if r["bits"] == 8)
    figures["upload_ratio_b8"] = round(fp32["bytes_up"] / b8["bytes_up"], 3)
    figures["round_ratio_b8"] = round(
        (fp32["bytes_up"] + fp32["bytes_down"])
        / (downlink_run["bytes_up"] + downlink_run["bytes_down"]),
        3,
    )
    figures.update(
        rounds=rounds, clients=CLIENTS, alpha=0.3, seeds=len(SEEDS), wall_seconds=round(wall, 1)
    )

    print(
        f"digits, {CLIENTS} clients, Dirichlet alpha 0.3, {rounds} rounds, FedAvg; accuracy ="
        " mean of the last 5 rounds (%), mean over seeds 0, 1, 2"
    )
    print_table(
        ["precision", "EMA", "acc %", "std", "per seed", "up B/round", "down B/round", "cpu s"],
        rows,
    )
    print()
    print_table(
        ["traffic per round (10 clients)", "bytes", "FP32 / this"],
        [
            ["FP32 up", int(fp32["bytes_up"]), 1.0],
            ["8-bit up", int(b8["bytes_up"]), figures["upload_ratio_b8"]],
            ["FP32 up + down", int(fp32["bytes_up"] + fp32["bytes_down"]), 1.0],
            [
                "8-bit up + 8-bit down",
                int(downlink_run["bytes_up"] + downlink_run["bytes_down"]),
                figures["round_ratio_b8"],
            ],
        ],
    )
    _plot(curves, Path(args.plot), rounds)
    print(f"plot: {args.plot}; wall time {wall:.0f} s with {args.jobs} worker(s)")
    print_json(figures)


def _name(bits: int, ema: bool) -> str:
    return ("fp32" if bits == 32 else f"b{bits}") + ("_ema" if ema else "")


def _plot(curves: dict[str, list[float]], path: Path, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        style = "-" if name.endswith("_ema") else "--"
        ax.plot(range(len(curve)), [100 * a for a in curve], style, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%), mean of 3 seeds")
    ax.set_title(f"digits, 10 clients, alpha 0.3, {rounds} rounds")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
