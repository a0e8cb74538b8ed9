"""bench.training's timing harness: the order of turns must not favour a function."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from bench.training import interleaved


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
