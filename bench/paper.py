"""The paper's FedAvg experiment on real Fashion-MNIST, side by side with its table.

Runs the real ServerApp and ClientApps (``fedlpt.inprocess``: Flower's message
serialization, no Ray) with the paper's setup: ConvNet, the paper's equal-sized
Dirichlet split, one exponent per kernel ("BC"), unweighted FedAvg, Adam 1e-3, batch 32,
1 local epoch, the server EMA broadcast as the next global model. Accuracy is the paper's
metric: the mean centralized test accuracy over the last 5 rounds.

Two scales:

* ``--scale paper``: 80 clients, 40% per round, 200 rounds, all 60,000 training and
  10,000 test images, seed 4: for a GPU (``--device cuda``);
* ``--scale cpu`` (default): a regime that runs on two CPU cores (see ``CPU_SCALE`` for
  what and why), 3 seeds; ``--quick`` runs it with one seed and fewer rounds.

Configs run in parallel processes (``--parallel``), each with ``--workers`` ClientApp
processes. Every run keeps its folder (results.json, checkpoint) under ``--out``; a run
whose folder already holds a checkpoint continues from it, so a run cut short by
``--time-limit`` (or anything else) can be finished by running the same command again.

    python -m bench.paper [--quick] [--scale cpu|paper] [--configs b8_ema,fp32,...]
                          [--engine auto|integer|emulated]

``b8_ema_row`` (8 bits + EMA with one exponent per output channel, which the integer
engine multiplies in int8) runs only when named.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import statistics
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import print_json, print_table

MEASURED_FILE = "bench-measured.json"
# The paper's README table, FedAvg on FMNIST (test accuracy %, last 5 rounds).
PAPER = {
    0.01: {"b8_ema": 80.1, "b6_ema": 78.0, "fp32_ema": 80.7, "fp32": 79.5, "b8": 72.2},
    0.04: {"b8_ema": 83.8, "fp32_ema": 83.6},
    0.16: {"b8_ema": 90.6, "fp32_ema": 90.7},
}
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"bits": 32, "ema": False},
    "fp32_ema": {"bits": 32, "ema": True},
    "b8_ema": {"bits": 8, "ema": True},
    "b8": {"bits": 8, "ema": False},
    "b6_ema": {"bits": 6, "ema": True},
    "b8_ema_warmup": {"bits": 8, "ema": True, "ema-warmup": 10},
    # One exponent per output channel instead of per kernel: the block the integer engine
    # multiplies in int8 (kernel blocks put exponents along every product's reduction).
    "b8_ema_row": {"bits": 8, "ema": True, "block": "row"},
}
# Run only when named (--configs): not the paper's table.
EXTRA_CONFIGS = ("b8_ema_row",)
LABELS = {
    "fp32": "32 bit, no EMA",
    "fp32_ema": "32 bit + EMA",
    "b8_ema": "8 bit + EMA",
    "b8": "8 bit, no EMA",
    "b6_ema": "6 bit + EMA",
    "b8_ema_warmup": "8 bit + EMA, warm-up 10",
    "b8_ema_row": "8 bit + EMA, row blocks",
}
# The paper's setup (conf/paper-fmnist.toml says the same).
PAPER_SETUP = {
    "dataset": "fmnist",
    "model": "convnet",
    "partitioner": "dirichlet-balanced",
    "alpha": 0.01,
    "block": "kernel",
    "rounding": "stochastic",
    "optimizer": "adam",
    "learning-rate": 0.001,
    "batch-size": 32,
    "local-epochs": 1,
    "aggregation-weights": "equal",
    "strategy.name": "fedavg",
    "strategy.fraction-train": 0.4,
    "ema-decay": 0.9,
    "ema-start": 1,
    "ema-warmup": 0,
}


@dataclass(frozen=True)
class Scale:
    """How big a reproduction is."""

    clients: int
    rounds: int
    seeds: tuple[int, ...]
    train_examples: int  # 0: all 60,000
    test_examples: int  # 0: all 10,000


PAPER_SCALE = Scale(clients=80, rounds=200, seeds=(4,), train_examples=0, test_examples=0)
# Two CPU cores. The paper's ConvNet (128 channels) costs about 0.2 s a step on one core,
# so the budget (~90 min for 3 seeds of 6 configs) allows about 1,600 local steps a run.
# The EMA matters when clients drift: at alpha 0.01 each client holds about one class and
# takes many steps towards it (the paper's take 24 a round). Spending the budget on fewer
# clients with as many steps as possible keeps that regime: 10 clients of 300 images (a
# fixed stratified 3,000-image subsample, so about 10 Adam steps each a round, against
# about 5 with 20 clients of 150), 40% sampled (4 a round, a few classes each round, as
# in the paper), 40 rounds; the server evaluates on a fixed stratified 1,000 of the
# 10,000 test images.
CPU_SCALE = Scale(clients=10, rounds=40, seeds=(0, 1, 2), train_examples=3000, test_examples=1000)
CPU_QUICK = Scale(clients=10, rounds=15, seeds=(0,), train_examples=3000, test_examples=1000)


def run_config(
    name: str,
    scale: Scale,
    seed: int,
    alpha: float,
    device: str,
    data_dir: str = "",
    configs: Mapping[str, Mapping[str, Any]] = CONFIGS,
    engine: str = "auto",
) -> dict[str, Any]:
    """The run config of one run: the paper's setup with ``configs[name]`` on top."""
    return {
        "data-dir": data_dir,
        **PAPER_SETUP,
        **configs[name],
        "alpha": alpha,
        "seed": seed,
        "num-server-rounds": scale.rounds,
        "train-examples": scale.train_examples,
        "test-examples": scale.test_examples,
        "device": device,
        "engine": engine,
    }


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One federation in this process (resumed if its folder holds a checkpoint)."""
    import torch

    from fedlpt.checkpoint import CHECKPOINT_FILE, Checkpoint
    from fedlpt.inprocess import simulate

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    folder = Path(job["folder"])
    config = {**job["run_config"], "results-dir": str(folder.parent), "run-name": folder.name}
    if (folder / CHECKPOINT_FILE).is_file():
        done = Checkpoint.load(folder).server_round
        if done >= config["num-server-rounds"]:
            measured = folder / MEASURED_FILE
            extra = json.loads(measured.read_text()) if measured.is_file() else {}
            return {**_summary(job, json.loads((folder / "results.json").read_text())), **extra}
        config["resume-from"] = str(folder)
    start = time.perf_counter()
    outcome = simulate(config, job["clients"], write_results=True, workers=job["workers"])
    report = outcome.recorder.report()
    # Peak resident memory of this run's process and its ClientApp workers (Linux: KiB).
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    extra = {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_kib / 1024}
    # Kept beside the results, so that reporting a finished run again shows what it took.
    (folder / MEASURED_FILE).write_text(json.dumps(extra))
    return {**_summary(job, report), **extra}


def run_all(jobs: list[dict[str, Any]], parallel: int) -> list[dict[str, Any]]:
    """Every job, ``parallel`` at a time, each in a spawned process of its own (not a
    daemon: a run starts ClientApp worker processes of its own)."""
    spawn = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = spawn.Queue()
    waiting, running, done = list(enumerate(jobs)), {}, {}
    while waiting or running:
        while waiting and len(running) < parallel:
            index, job = waiting.pop(0)
            process = spawn.Process(target=_run_into, args=(job, index, results))
            process.start()
            running[index] = process
        index, outcome = results.get()
        running.pop(index).join()
        if isinstance(outcome, str):
            raise RuntimeError(f"run {jobs[index]['folder']} failed:\n{outcome}")
        done[index] = outcome
    return [done[i] for i in range(len(jobs))]


def _run_into(job: dict[str, Any], index: int, results: multiprocessing.Queue) -> None:
    try:
        results.put((index, run_one(job)))
    except BaseException:
        results.put((index, traceback.format_exc()))


def _summary(job: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    rows = report["rounds"]
    trained = [r for r in rows if r["round"] > 0]
    return {
        "name": job["name"],
        "seed": job["seed"],
        "rounds": len(trained),
        "accuracy": [r["accuracy"] for r in rows],
        "megabytes": [r["cumulative-mb"] for r in rows],
        "last5": statistics.mean(r["accuracy"] for r in trained[-5:]) if trained else 0.0,
        "bytes_up": statistics.mean(r["bytes-up"] for r in trained) if trained else 0.0,
        "bytes_down": statistics.mean(r["bytes-down"] for r in trained) if trained else 0.0,
    }


def run_tag(args: argparse.Namespace) -> str:
    """The folder of a bench's runs under ``--out``: scale, alpha and, when named, the
    engine (so that runs of different engines are never resumed from each other)."""
    tag = f"{args.scale}{'-quick' if args.quick else ''}-alpha{args.alpha:g}"
    return tag + (f"-{args.engine}" if args.engine != "auto" else "")


def add_run_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every FMNIST federation bench shares: scale, data, processes, folders."""
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rounds (CPU scale)")
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--configs", default="", help="comma-separated subset of the configs")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--engine",
        choices=("auto", "integer", "emulated"),
        default="auto",
        help="the clients' low-precision engine (a named one gets run folders of its own)",
    )
    parser.add_argument("--data-dir", default="", help="a folder of the FMNIST IDX files")
    parser.add_argument("--workers", type=int, default=0, help="ClientApp processes per run")
    parser.add_argument("--parallel", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument(
        "--plot", type=Path, default=None, help="figure stem (default: OUT/TAG/<bench name>)"
    )


def make_jobs(
    names: Sequence[str],
    scale: Scale,
    folder: Path,
    args: argparse.Namespace,
    configs: Mapping[str, Mapping[str, Any]] = CONFIGS,
) -> list[dict[str, Any]]:
    """One job per config and seed, each with its run folder ``folder/<name>-seed<seed>``."""
    return [
        {
            "name": name,
            "seed": seed,
            "clients": scale.clients,
            "workers": args.workers,
            "folder": str(folder / f"{name}-seed{seed}"),
            "run_config": run_config(
                name, scale, seed, args.alpha, args.device, args.data_dir, configs, args.engine
            ),
        }
        for name in names
        for seed in scale.seeds
    ]


def mean_curve(runs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Accuracy and cumulative MB per round (round 0 first), each the mean over ``runs``,
    as far as the shortest run went."""
    length = min(len(r["accuracy"]) for r in runs)
    accuracy = [statistics.mean(r["accuracy"][i] for r in runs) for i in range(length)]
    megabytes = [statistics.mean(r["megabytes"][i] for r in runs) for i in range(length)]
    return accuracy, megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, Path("results/bench_paper"))
    args = parser.parse_args()
    scales = {"paper": PAPER_SCALE, "cpu": CPU_QUICK if args.quick else CPU_SCALE}
    scale = scales[args.scale]
    names = (
        args.configs.split(",")
        if args.configs
        else [
            n
            for n in CONFIGS
            if n not in EXTRA_CONFIGS and (n != "b8_ema_warmup" or args.scale == "cpu")
        ]
    )
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    tag = run_tag(args)
    jobs = make_jobs(names, scale, args.out / tag, args)
    started = time.perf_counter()
    results = run_all(jobs, args.parallel)
    wall = time.perf_counter() - started
    report(results, names, scale, args, tag, wall)


def report(results, names, scale: Scale, args, tag: str, wall: float) -> None:
    """Print the table beside the paper's, draw the figure, print the JSON line."""
    paper = PAPER.get(args.alpha, {})
    rows, figures, curves = [], {}, []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        accs = [100 * r["last5"] for r in runs]
        mean = statistics.mean(accs)
        figures[f"acc_{name}"] = round(mean, 2)
        rows.append(
            [
                LABELS[name],
                mean,
                statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                " ".join(f"{a:.1f}" for a in accs),
                paper.get(name, "-"),
                min(r["rounds"] for r in runs),
                int(runs[0]["bytes_up"]),
            ]
        )
        curves.append((LABELS[name], runs))
    fp32 = next((r for r in results if r["name"] == "fp32"), None)
    b8 = next((r for r in results if r["name"].startswith("b8")), None)
    if fp32 and b8 and b8["bytes_up"]:
        figures["upload_ratio_b8"] = round(fp32["bytes_up"] / b8["bytes_up"], 3)
    for name in ("b8_ema", "b8", "b8_ema_warmup"):
        runs = [r for r in results if r["name"] == name]
        if runs and all(len(r["accuracy"]) > 10 for r in runs):
            figures[f"acc_{name}_round10"] = round(
                100 * statistics.mean(r["accuracy"][10] for r in runs), 2
            )
    measured = [r["peak_rss_mb"] for r in results if "peak_rss_mb" in r]
    if measured:
        figures["peak_rss_mb"] = round(max(measured), 1)
    figures.update(upload_bytes_per_client())
    figures.update(
        alpha=args.alpha,
        engine=args.engine,
        clients=scale.clients,
        rounds=scale.rounds,
        seeds=len(scale.seeds),
        scale=args.scale,
        wall_seconds=round(wall, 1),
    )
    print(
        f"FMNIST, {scale.clients} clients (40% per round), alpha {args.alpha:g}, "
        f"{scale.rounds} rounds, FedAvg (unweighted), ConvNet, block=kernel (row: *_row), engine "
        f"{args.engine}; accuracy = mean of "
        f"the last 5 rounds (%), mean over seeds {list(scale.seeds)}"
    )
    print_table(["config", "acc %", "std", "per seed", "paper", "rounds done", "up B/round"], rows)
    _plot(curves, args.plot or args.out / tag / "paper", tag)
    print_json(figures)


def upload_bytes_per_client() -> dict[str, int]:
    """One client's upload of the FMNIST ConvNet as Flower serializes it: FP32, and 8 bits
    with one exponent per row (fedlpt's default) and per kernel (the paper's "BC")."""
    import torch
    from flwr.app import ArrayRecord

    from fedlpt.quant import BFP
    from fedlpt.quant.wire import encode_arrays
    from fedlpt.strategy.traffic import serialized_size
    from fedlpt.task import build_model

    torch.manual_seed(0)
    state = build_model("fmnist", "convnet").state_dict()
    return {
        "upload_bytes_fp32": serialized_size(ArrayRecord(state)),
        **{
            f"upload_bytes_b8_{block}": serialized_size(encode_arrays(state, BFP(8, block)))
            for block in ("row", "kernel")
        },
    }


def _plot(curves, stem: Path, title: str) -> None:
    from fedlpt.figures import Curve, accuracy_figure, save_figure

    mean_curves = []
    for label, runs in curves:
        accuracy, megabytes = mean_curve(runs)
        mean_curves.append(Curve(label, list(range(len(accuracy))), accuracy, megabytes))
    paths = save_figure(accuracy_figure(mean_curves, f"Fashion-MNIST, {title}"), stem)
    print("figure:", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
