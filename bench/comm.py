"""Accuracy per byte: what delta uploads, fewer upload bits and a quantized downlink buy.

The paper's FedAvg experiment on real Fashion-MNIST (``bench.paper``'s setup, data,
split, clients, rounds and seeds; the server EMA in every config), run through the real
ServerApp and ClientApps with these configs:

* ``fp32``: FP32 training and traffic (with the EMA, as the paper);
* ``b8``: 8-bit training, 8-bit weights upload, FP32 downlink (the paper's 8 bit + EMA);
* ``delta{4,2}_{ef,noef}``: 8-bit training, the clients upload their change to the model
  in 4 or 2 bits, with or without client-side error feedback (``upload-feedback``);
* ``delta{4,2}_{ef,noef}_row``: the same with ``upload-block = "row"``: one exponent
  per output channel instead of the paper's per-kernel exponents, which cost 8 bits per
  3x3 kernel and per classifier weight whatever the word length;
* ``delta2_{ef,noef}_tensor``: 2-bit deltas with one exponent per tensor;
* ``delta2_{ef,noef}_row_nearest``: 2-bit row deltas rounded to nearest (biased: a small
  change rounds to 0 every round unless fed back);
* ``delta2_{ef,noef}_tensor_nearest``: 2-bit deltas, one exponent per tensor, rounded to
  nearest: every change under half the tensor's largest step rounds to 0, the coarsest
  biased upload here; ``delta2_ef_tensor_nearest_age1`` drops a residual the client
  did not send back the very next round (``feedback-max-age = 1``);
* ``delta2_ef_row_down{8,4}``: 2-bit row deltas up and an 8- or 4-bit row-block downlink
  with the server's error feedback;
* ``down8_{ef,noef}``: ``b8`` with an 8-bit downlink, with or without the server's
  error feedback (``downlink-feedback``).

An FP32-downlink ``down32`` would be ``b8`` itself, so it is not run: ``acc_down32`` is
``acc_b8``. Every byte figure is read from the runs' ``results.json`` (``bytes-up``,
``bytes-down``, ``cumulative-mb``). "MB to target" is the cumulative traffic (up + down)
after the first round at which the seed-mean accuracy reaches the target: the fp32
run's last-5 accuracy (seed mean) minus 1 point. A ratio ``X_vs_Y`` is X / Y.

    python -m bench.comm [--quick] [--configs fp32,delta2_ef,...] [--rounds N] [--seeds 0,1,2]
                         [--parallel 2]

Where a config ``X_ef_Y`` and its ``X_noef_Y`` both ran, a second table pairs them by seed:
the mean gain of error feedback, the spread of that gain, and on how many seeds it is ahead.

Runs resume like ``bench.paper``'s: every run keeps its folder under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench._common import print_json, print_table
from bench.paper import (
    CPU_QUICK,
    CPU_SCALE,
    PAPER_SCALE,
    Scale,
    add_run_arguments,
    make_jobs,
    mean_curve,
    run_all,
    run_tag,
)

MB = 1e6  # as fedlpt.results
TARGET_MARGIN = 1.0  # points below the fp32 run's last-5 accuracy
_B8 = {"bits": 8, "ema": True}
_DELTA_ROW = {**_B8, "upload": "delta", "upload-block": "row", "upload-feedback": True}
_DOWN_ROW = {"downlink-block": "row", "downlink-feedback": True}
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"bits": 32, "ema": True},
    "b8": {**_B8, "upload": "weights"},
    "delta4_ef": {**_B8, "upload": "delta", "upload-bits": 4, "upload-feedback": True},
    "delta4_noef": {**_B8, "upload": "delta", "upload-bits": 4, "upload-feedback": False},
    "delta2_ef": {**_B8, "upload": "delta", "upload-bits": 2, "upload-feedback": True},
    "delta2_noef": {**_B8, "upload": "delta", "upload-bits": 2, "upload-feedback": False},
    # The same deltas with one exponent per output channel instead of the paper's per
    # kernel (8 exponent bits per 3x3 kernel and per classifier weight at any word length).
    "delta4_ef_row": {**_DELTA_ROW, "upload-bits": 4},
    "delta4_noef_row": {**_DELTA_ROW, "upload-bits": 4, "upload-feedback": False},
    "delta2_ef_row": {**_DELTA_ROW, "upload-bits": 2},
    "delta2_noef_row": {**_DELTA_ROW, "upload-bits": 2, "upload-feedback": False},
    # One exponent per tensor: a row of small changes rounds to 0 unless fed back.
    "delta2_ef_tensor": {**_DELTA_ROW, "upload-bits": 2, "upload-block": "tensor"},
    "delta2_noef_tensor": {
        **_DELTA_ROW,
        "upload-bits": 2,
        "upload-block": "tensor",
        "upload-feedback": False,
    },
    # Nearest rounding is biased (small changes round to 0 every round): error feedback's case.
    "delta2_ef_row_nearest": {**_DELTA_ROW, "upload-bits": 2, "upload-rounding": "nearest"},
    "delta2_noef_row_nearest": {
        **_DELTA_ROW,
        "upload-bits": 2,
        "upload-rounding": "nearest",
        "upload-feedback": False,
    },
    # The coarsest biased upload: one exponent per tensor and nearest rounding send 0 for
    # every change under half the tensor's largest step.
    "delta2_ef_tensor_nearest": {
        **_DELTA_ROW,
        "upload-bits": 2,
        "upload-block": "tensor",
        "upload-rounding": "nearest",
    },
    "delta2_noef_tensor_nearest": {
        **_DELTA_ROW,
        "upload-bits": 2,
        "upload-block": "tensor",
        "upload-rounding": "nearest",
        "upload-feedback": False,
    },
    # Feedback only from the round before: is a stale residual what costs accuracy?
    "delta2_ef_tensor_nearest_age1": {
        **_DELTA_ROW,
        "upload-bits": 2,
        "upload-block": "tensor",
        "upload-rounding": "nearest",
        "feedback-max-age": 1,
    },
    # Both directions compressed: 2-bit row deltas up, an 8- or 4-bit row-block model down.
    "delta2_ef_row_down8": {**_DELTA_ROW, "upload-bits": 2, **_DOWN_ROW, "downlink-bits": 8},
    "delta2_ef_row_down4": {**_DELTA_ROW, "upload-bits": 2, **_DOWN_ROW, "downlink-bits": 4},
    "down8_ef": {**_B8, "upload": "weights", "downlink-bits": 8, "downlink-feedback": True},
    "down8_noef": {**_B8, "upload": "weights", "downlink-bits": 8, "downlink-feedback": False},
}
LABELS = {
    "fp32": "FP32",
    "b8": "8-bit weights up",
    "delta4_ef": "4-bit delta up + EF",
    "delta4_noef": "4-bit delta up, no EF",
    "delta2_ef": "2-bit delta up + EF",
    "delta2_noef": "2-bit delta up, no EF",
    "delta4_ef_row": "4-bit delta up (row) + EF",
    "delta4_noef_row": "4-bit delta up (row), no EF",
    "delta2_ef_row": "2-bit delta up (row) + EF",
    "delta2_noef_row": "2-bit delta up (row), no EF",
    "delta2_ef_tensor": "2-bit delta up (tensor) + EF",
    "delta2_noef_tensor": "2-bit delta up (tensor), no EF",
    "delta2_ef_row_nearest": "2-bit delta up (row, nearest) + EF",
    "delta2_noef_row_nearest": "2-bit delta up (row, nearest), no EF",
    "delta2_ef_tensor_nearest": "2-bit delta up (tensor, nearest) + EF",
    "delta2_noef_tensor_nearest": "2-bit delta up (tensor, nearest), no EF",
    "delta2_ef_tensor_nearest_age1": "2-bit delta up (tensor, nearest) + EF of 1 round",
    "delta2_ef_row_down8": "2-bit delta up (row) + EF, 8-bit down (row) + EF",
    "delta2_ef_row_down4": "2-bit delta up (row) + EF, 4-bit down (row) + EF",
    "down8_ef": "8-bit down + EF",
    "down8_noef": "8-bit down, no EF",
}


def mb_to_target(
    accuracy: Sequence[float], megabytes: Sequence[float], target: float
) -> float | None:
    """Cumulative MB after the first trained round (index >= 1; index 0 is the initial
    model) whose accuracy reaches ``target``; None if none does."""
    for accuracy_now, mb in zip(accuracy[1:], megabytes[1:], strict=True):
        if accuracy_now >= target:
            return mb
    return None


def summarize(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict]:
    """Per config, over its seeds: last-5 accuracy (%: mean, std, per seed), upload and
    download MB per round, the seed-mean curve, and the MB to reach the target (when
    ``fp32`` is among the configs)."""
    summary: dict[str, dict] = {}
    for name in names:
        runs = [r for r in results if r["name"] == name]
        accs = [100 * r["last5"] for r in runs]
        accuracy, megabytes = mean_curve(runs)
        summary[name] = {
            "acc": statistics.mean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "per_seed": accs,
            "seeds": [r["seed"] for r in runs],
            "rounds": min(r["rounds"] for r in runs),
            "up_mb": statistics.mean(r["bytes_up"] for r in runs) / MB,
            "down_mb": statistics.mean(r["bytes_down"] for r in runs) / MB,
            "accuracy": accuracy,
            "megabytes": megabytes,
        }
    target = target_accuracy(summary)
    for entry in summary.values():
        entry["mb_to_target"] = (
            None if target is None else mb_to_target(entry["accuracy"], entry["megabytes"], target)
        )
    return summary


def error_feedback_gains(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What error feedback adds, paired by seed, for every ``X_ef_Y`` config whose
    ``X_noef_Y`` ran too (keyed ``X_Y``): over the seeds both ran, the mean and sample
    standard deviation of (feedback - no feedback) last-5 accuracy in points, how many
    seeds feedback is ahead on, and the larger of the two configs' seed spreads (std).

    Seeds move both configs of a pair together (same data split, same sampled clients),
    so the paired difference separates feedback's effect from the spread between seeds.
    """
    gains: dict[str, dict[str, Any]] = {}
    for name, with_ef in summary.items():
        if "_ef_" not in f"{name}_":
            continue
        head, _, tail = f"{name}_".partition("_ef_")
        without = summary.get(f"{head}_noef_{tail}".rstrip("_"))
        if without is None:
            continue
        noef = dict(zip(without["seeds"], without["per_seed"], strict=True))
        diffs = [
            acc - noef[seed]
            for seed, acc in zip(with_ef["seeds"], with_ef["per_seed"], strict=True)
            if seed in noef
        ]
        if not diffs:
            continue
        gains[f"{head}_{tail}".rstrip("_")] = {
            "gain": statistics.mean(diffs),
            "paired_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "ahead": sum(d > 0 for d in diffs),
            "seeds": len(diffs),
            "spread": max(with_ef["std"], without["std"]),
        }
    return gains


def target_accuracy(summary: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The target accuracy in [0, 1]: fp32's seed-mean last-5 minus TARGET_MARGIN points."""
    if "fp32" not in summary:
        return None
    return (summary["fp32"]["acc"] - TARGET_MARGIN) / 100


def figures(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON line's figures of the configs (the scale is added by the caller)."""
    out: dict[str, Any] = {f"acc_{n}": round(s["acc"], 2) for n, s in summary.items()}
    if "b8" in summary:
        out["acc_down32"] = out["acc_b8"]  # down32 is b8: b8's downlink is FP32
        for bits in (4, 2):
            for block in ("", "_row", "_tensor"):
                delta = summary.get(f"delta{bits}_ef{block}") or summary.get(
                    f"delta{bits}_noef{block}"
                )
                if delta and summary["b8"]["up_mb"]:
                    out[f"upload_ratio_delta{bits}{block}_vs_b8"] = round(
                        delta["up_mb"] / summary["b8"]["up_mb"], 4
                    )
    for key, gain in error_feedback_gains(summary).items():
        out[f"ef_gain_{key}"] = round(gain["gain"], 3)
        out[f"ef_gain_{key}_paired_std"] = round(gain["paired_std"], 3)
        out[f"ef_ahead_{key}"] = gain["ahead"]
        out[f"ef_seeds_{key}"] = gain["seeds"]
    target = target_accuracy(summary)
    if target is None:
        return out
    out["target_acc"] = round(100 * target, 2)
    for name, s in summary.items():
        out[f"mb_to_target_{name}"] = (
            None if s["mb_to_target"] is None else round(s["mb_to_target"], 3)
        )
    reached = {n: s["mb_to_target"] for n, s in summary.items() if s["mb_to_target"] is not None}
    best = min(reached, key=reached.__getitem__) if reached else None
    fp32 = reached.get("fp32")
    out["mb_to_target_best"] = best
    out["mb_to_target_best_vs_fp32"] = round(reached[best] / fp32, 4) if best and fp32 else None
    return out


def table_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[list[object]]:
    """The printed table's rows, one per config."""
    target = target_accuracy(summary)
    rows = []
    for name, s in summary.items():
        mb = s["mb_to_target"]
        rows.append(
            [
                name,
                f"{s['acc']:.2f} ± {s['std']:.2f}",
                " ".join(f"{a:.1f}" for a in s["per_seed"]),
                s["rounds"],
                f"{s['up_mb']:.4f}",
                f"{s['down_mb']:.4f}",
                "-" if target is None else ("not reached" if mb is None else f"{mb:.2f}"),
            ]
        )
    return rows


def plot(summary: Mapping[str, Mapping[str, Any]], stem: Path, title: str) -> list[Path]:
    """Seed-mean accuracy against cumulative MB (log scale), one line per config, the
    target as a dashed line; saved by ``fedlpt.figures.save_figure``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedlpt.figures import save_figure

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for name, s in summary.items():
        points = [(mb, 100 * a) for mb, a in zip(s["megabytes"], s["accuracy"], strict=True)]
        points = [p for p in points if p[0] > 0]  # round 0 sends nothing: off a log axis
        if not points:
            continue
        style = "--" if "_noef" in name else "-"
        label = LABELS.get(name, name)
        axis.plot(*zip(*points, strict=True), style, marker="o", markersize=2.5, label=label)
    target = target_accuracy(summary)
    if target is not None:
        axis.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label="target")
    axis.set_xscale("log")
    plain = matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
    axis.xaxis.set_major_formatter(plain)  # 20, not 2 x 10^1
    axis.xaxis.set_minor_formatter(plain)
    axis.set_xlabel("cumulative MB sent (up + down)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7, loc="upper left")  # accuracy stays below 65 %: room above
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, Path("results/bench_comm"))
    parser.add_argument("--rounds", type=int, default=0, help="override the scale's rounds")
    parser.add_argument(
        "--seeds", default="", help="comma-separated seeds, overriding the scale's (e.g. 0,1,2,3,4)"
    )
    args = parser.parse_args()
    scales = {"paper": PAPER_SCALE, "cpu": CPU_QUICK if args.quick else CPU_SCALE}
    scale: Scale = scales[args.scale]
    if args.rounds:
        scale = dataclasses.replace(scale, rounds=args.rounds)
    if args.seeds:
        try:
            seeds = tuple(int(seed) for seed in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds!r}")
        # Run folders are named by seed, so runs shared with the default seeds are reused.
        scale = dataclasses.replace(scale, seeds=seeds)
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    tag = run_tag(args)
    tag += f"-rounds{args.rounds}" if args.rounds else ""
    jobs = make_jobs(names, scale, args.out / tag, args, CONFIGS)
    started = time.perf_counter()
    results = run_all(jobs, args.parallel)
    wall = time.perf_counter() - started
    summary = summarize(results, names)
    target = target_accuracy(summary)
    print(
        f"FMNIST, {scale.clients} clients (40% per round), alpha {args.alpha:g}, "
        f"{scale.rounds} rounds, FedAvg (unweighted), ConvNet, EMA; accuracy = mean of the "
        f"last 5 rounds (%), mean ± std over seeds {list(scale.seeds)}; target = fp32 - "
        f"{TARGET_MARGIN:g} = " + ("-" if target is None else f"{100 * target:.2f} %")
    )
    print_table(
        ["config", "acc %", "per seed", "rounds", "up MB/round", "down MB/round", "MB to target"],
        table_rows(summary),
    )
    if "b8" in summary:
        print("down32 (FP32 downlink) is b8: acc_down32 = acc_b8")
    gains = error_feedback_gains(summary)
    if gains:
        print("error feedback, paired by seed: feedback - no feedback, last-5 accuracy (points)")
        print_table(
            ["pair", "gain", "paired std", "seeds ahead", "seed spread"],
            [
                [
                    key,
                    f"{g['gain']:+.2f}",
                    f"{g['paired_std']:.2f}",
                    f"{g['ahead']}/{g['seeds']}",
                    f"{g['spread']:.2f}",
                ]
                for key, g in gains.items()
            ],
        )
    paths = plot(summary, args.plot or args.out / tag / "comm", f"Fashion-MNIST, {tag}")
    print("figure:", ", ".join(str(p) for p in paths))
    print_json(
        {
            **figures(summary),
            "alpha": args.alpha,
            "engine": args.engine,
            "clients": scale.clients,
            "rounds": scale.rounds,
            "seeds": len(scale.seeds),
            "scale": args.scale,
            "quick": args.quick,
            "wall_seconds": round(wall, 1),
        }
    )


if __name__ == "__main__":
    main()
