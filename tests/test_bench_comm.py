"""bench.comm's pure parts: MB to the target accuracy, the summary over seeds, the figures."""

from __future__ import annotations

import random

import pytest

from bench.comm import (
    CONFIGS,
    error_feedback_gains,
    figures,
    mb_to_target,
    summarize,
    table_rows,
)
from fedlpt.config import AppConfig, default_run_config


def test_mb_to_target_is_the_first_trained_round_that_reaches_it() -> None:
    accuracy = [0.9, 0.5, 0.7, 0.8, 0.75]  # round 0 (the initial model) never counts
    megabytes = [0.0, 2.0, 4.0, 6.0, 8.0]
    assert mb_to_target(accuracy, megabytes, 0.7) == 4.0
    assert mb_to_target(accuracy, megabytes, 0.5) == 2.0
    assert mb_to_target(accuracy, megabytes, 0.81) is None
    assert mb_to_target([0.1], [0.0], 0.0) is None


def _run(name: str, seed: int, accuracy: list[float], up: float, down: float) -> dict:
    """A run's summary as bench.paper's run_one returns it (bytes as results.json has them)."""
    megabytes, total = [0.0], 0.0
    for _ in accuracy[1:]:
        total += (up + down) / 1e6
        megabytes.append(total)
    trained = accuracy[1:]
    return {
        "name": name,
        "seed": seed,
        "rounds": len(trained),
        "accuracy": accuracy,
        "megabytes": megabytes,
        "last5": sum(trained[-5:]) / len(trained[-5:]),
        "bytes_up": up,
        "bytes_down": down,
    }


def _results() -> list[dict]:
    rng = random.Random(0)
    results = []
    for seed in (0, 1, 2):
        ramp = [0.1] + [min(0.8, 0.1 * r) + rng.uniform(-0.005, 0.005) for r in range(1, 13)]
        results.append(_run("fp32", seed, ramp, 4e6, 4e6))
        results.append(_run("b8", seed, ramp, 1e6, 4e6))
        results.append(_run("delta4_ef", seed, [a - 0.003 for a in ramp], 0.5e6, 4e6))
        results.append(_run("delta2_noef", seed, [0.1] + [0.3] * 12, 0.25e6, 4e6))
    return results


def test_summary_over_seeds() -> None:
    results = _results()
    names = ["fp32", "b8", "delta4_ef", "delta2_noef"]
    summary = summarize(results, names)
    assert list(summary) == names
    fp32 = summary["fp32"]
    seeds = [100 * r["last5"] for r in results if r["name"] == "fp32"]
    assert fp32["acc"] == pytest.approx(sum(seeds) / 3)
    assert fp32["per_seed"] == pytest.approx(seeds)
    assert 0 < fp32["std"] < 0.5
    assert fp32["rounds"] == 12
    assert (fp32["up_mb"], fp32["down_mb"]) == pytest.approx((4.0, 4.0))
    assert summary["delta4_ef"]["up_mb"] == pytest.approx(0.5)
    # the seed-mean curve; the target (fp32 - 1 point, about 79 %) is first reached at
    # round 8 (0.8), after 8 rounds of traffic
    assert len(fp32["accuracy"]) == 13
    assert fp32["mb_to_target"] == pytest.approx(8 * 8.0)
    assert summary["b8"]["mb_to_target"] == pytest.approx(8 * 5.0)
    assert summary["delta4_ef"]["mb_to_target"] == pytest.approx(8 * 4.5)
    assert summary["delta2_noef"]["mb_to_target"] is None

    out = figures(summary)
    assert out["acc_down32"] == out["acc_b8"]
    assert out["upload_ratio_delta4_vs_b8"] == pytest.approx(0.5)
    assert "upload_ratio_delta2_vs_b8" in out  # from delta2_noef when delta2_ef is not run
    assert out["mb_to_target_delta2_noef"] is None
    assert out["mb_to_target_best"] == "delta4_ef"
    assert out["mb_to_target_best_vs_fp32"] == pytest.approx(4.5 / 8.0)
    rows = {row[0]: row for row in table_rows(summary)}
    assert rows["delta2_noef"][-1] == "not reached"
    assert rows["fp32"][-1] == "64.00"


def test_without_fp32_there_is_no_target() -> None:
    summary = summarize(_results(), ["b8", "delta4_ef"])
    assert summary["b8"]["mb_to_target"] is None
    out = figures(summary)
    assert not any(key.startswith("mb_to_target") for key in out)
    assert table_rows(summary)[0][-1] == "-"


def test_configs_set_what_the_names_say() -> None:
    assert CONFIGS["fp32"]["bits"] == 32
    assert all(c["ema"] for c in CONFIGS.values())
    for bits in (4, 2):
        for feedback, suffix in ((True, "ef"), (False, "noef")):
            delta = CONFIGS[f"delta{bits}_{suffix}"]
            assert (delta["bits"], delta["upload"], delta["upload-bits"]) == (8, "delta", bits)
            assert delta["upload-feedback"] is feedback
            down = CONFIGS[f"down8_{suffix}"]
            assert (down["downlink-bits"], down["downlink-feedback"]) == (8, feedback)
    assert "downlink-bits" not in CONFIGS["b8"]  # b8 is down32: an FP32 downlink
    for name, config in CONFIGS.items():
        AppConfig.from_run_config({**default_run_config(), **config})  # every key checks out
        assert ("_row" in name) == (config.get("upload-block") == "row"), name
        assert ("_tensor" in name) == (config.get("upload-block") == "tensor"), name
        assert ("nearest" in name) == (config.get("upload-rounding") == "nearest"), name
        for bits in (8, 4):
            if name.endswith(f"_down{bits}"):
                assert (config["downlink-bits"], config["downlink-block"]) == (bits, "row")
                assert config["downlink-feedback"] and config["upload-bits"] == 2


def test_error_feedback_gains_pair_runs_by_seed() -> None:
    flat = [0.1] + [0.5] * 6
    results = []
    # Feedback ahead by 1, 3 and -1 points on seeds 0, 1, 2; seed 3 ran only with feedback.
    for seed, gain in ((0, 0.01), (1, 0.03), (2, -0.01), (3, 0.2)):
        base = [a + 0.1 * seed for a in flat]
        results.append(_run("delta2_ef_row", seed, [a + gain for a in base], 1e5, 4e6))
        if seed < 3:
            results.append(_run("delta2_noef_row", seed, base, 1e5, 4e6))
    for seed in (0, 1):
        results.append(_run("down8_ef", seed, flat, 1e6, 1e6))
    names = ["delta2_ef_row", "delta2_noef_row", "down8_ef"]
    gains = error_feedback_gains(summarize(results, names))
    assert list(gains) == ["delta2_row"]  # down8_ef has no down8_noef to pair with
    gain = gains["delta2_row"]
    assert gain["seeds"] == 3 and gain["ahead"] == 2
    assert gain["gain"] == pytest.approx(1.0)
    assert gain["paired_std"] == pytest.approx(2.0)
    # The seeds move both configs by 10 points each: the spread dwarfs the paired one.
    assert gain["spread"] > 8
    out = figures(summarize(results, names))
    assert out["ef_gain_delta2_row"] == pytest.approx(1.0)
    assert out["ef_ahead_delta2_row"] == 2 and out["ef_seeds_delta2_row"] == 3


def test_error_feedback_pairs_plain_names() -> None:
    results = [_run(n, 0, [0.1, 0.5, 0.6], 1e5, 1e6) for n in ("delta2_ef", "delta2_noef")]
    gains = error_feedback_gains(summarize(results, ["delta2_ef", "delta2_noef"]))
    assert gains["delta2"]["gain"] == pytest.approx(0.0)
    assert gains["delta2"]["paired_std"] == 0.0 and gains["delta2"]["ahead"] == 0
