"""bench.training's timing harness: the order of turns must not favour a function."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from itertools import pairwise

import torch

from bench.training import (
    BREAKDOWN,
    STEP_ENGINES,
    client_rounds,
    engine_probe,
    interleaved,
    memory_probe,
    saved_megabytes,
    step_breakdown,
    step_ratios,
)


def test_interleaved_turns_give_every_function_every_predecessor() -> None:
    # A rotated fixed cycle gives each function the same predecessor every round, so a
    # cheap call timed right after an expensive one would always pay for its traffic.
    calls: list[str] = []
    functions = {name: (lambda n=name: calls.append(n)) for name in "abcd"}
    medians, times, cpu = interleaved(functions, repeats=200, sync=lambda: None)
    assert set(medians) == set("abcd")
    assert all(len(v) == 200 for v in times.values())
    assert all(len(v) == 200 and min(v) >= 0 for v in cpu.values())
    timed = calls[12:]  # after the three warm-up rounds
    pairs = Counter(pairwise(timed))
    for name in "abcd":
        predecessors = {before for (before, after) in pairs if after == name and before != name}
        assert predecessors == set("abcd") - {name}
    rounds = [tuple(timed[i : i + 4]) for i in range(0, len(timed), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each round runs each once
    assert len(set(rounds)) > 4  # shuffled, not rotated


def test_the_breakdown_changes_one_part_of_the_8bit_recipe_at_a_time() -> None:
    full = BREAKDOWN["lpt8"]
    assert BREAKDOWN["fp32"].is_fp32
    nearest = BREAKDOWN["lpt8_nearest_activations"]
    assert (nearest.weight, nearest.gradient) == (full.weight, full.gradient)
    assert nearest.activation == dataclasses.replace(full.activation, rounding="nearest")
    assert nearest.error == dataclasses.replace(full.error, rounding="nearest")
    optimizer = BREAKDOWN["weights_and_gradients_only"]
    assert (optimizer.weight, optimizer.gradient) == (full.weight, full.gradient)
    assert optimizer.activation is None and optimizer.error is None
    quantizers = BREAKDOWN["activations_and_errors_only"]
    assert (quantizers.activation, quantizers.error) == (full.activation, full.error)
    assert quantizers.weight is None and quantizers.gradient is None


def test_the_breakdown_times_every_recipe_against_fp32() -> None:
    ratios = step_breakdown(torch.device("cpu"), image_size=8, repeats=2)
    assert list(ratios) == list(BREAKDOWN)
    assert ratios["fp32"] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_the_step_is_timed_on_both_engines_against_fp32() -> None:
    timings = step_ratios(torch.device("cpu"), image_size=8, repeats=2)
    assert list(timings) == [name for name, *_ in STEP_ENGINES] == ["fp32", "lpt8", "int8"]
    assert timings["fp32"].ratio == 1.0
    assert all(math.isfinite(t.ratio) and t.ms > 0 for t in timings.values())


def test_the_memory_figures_read_what_each_engine_keeps() -> None:
    saved = {
        name: saved_megabytes(recipe, engine, batch=8) for name, recipe, engine in STEP_ENGINES
    }
    assert saved["int8"] < 0.3 * saved["fp32"] < 0.3 * saved["lpt8"]
    probe = memory_probe("int8", batch=8)
    assert probe["held"] == probe["after"] - probe["before"]


def test_a_client_round_runs_on_every_engine_and_auto_names_its_pick() -> None:
    dataset, medians, cpu = client_rounds(repeats=1, examples=32)
    assert dataset in ("fmnist", "digits")
    assert set(medians) == set(cpu) == {"fp32", "lpt8", "int8"}
    assert all(s > 0 for s in medians.values())
    chosen = engine_probe()
    assert chosen["engine"] in ("integer", "emulated") and chosen["why"]
