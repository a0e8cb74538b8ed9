"""fedlpt.compare: one figure with every run's curve, a table, clear errors."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from fedlpt.compare import main
from fedlpt.inprocess import simulate

FAST = {"model": "mlp", "num-server-rounds": 2, "batch-size": 64}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("results")
    runs = []
    for overrides in ({}, {"bits": 32, "ema": False}):
        config = {**FAST, **overrides, "results-dir": str(root)}
        runs.append(simulate(config, 2, write_results=True).recorder.folder)
    return runs


def test_two_runs_make_one_figure_with_both_curves(two_runs, tmp_path, capsys) -> None:
    assert main([*map(str, two_runs), "--out", str(tmp_path / "cmp")]) == 0
    with Image.open(tmp_path / "cmp.png") as image:
        assert image.size == (2700, 1080)  # 9 x 3.6 inches at 300 dpi
    svg = (tmp_path / "cmp.svg").read_text()
    legend = re.findall(r"<!-- (8-bit, EMA 0.9|FP32, no EMA) -->", svg)
    assert sorted(set(legend)) == ["8-bit, EMA 0.9", "FP32, no EMA"]
    assert (tmp_path / "cmp.pdf").read_bytes()[:4] == b"%PDF"
    table = capsys.readouterr().out
    assert "8-bit, EMA 0.9" in table and "FP32, no EMA" in table


def test_a_run_folder_draws_its_own_figure(two_runs) -> None:
    for suffix in ("png", "svg", "pdf"):
        assert (two_runs[0] / f"accuracy.{suffix}").is_file()
    report = json.loads((two_runs[0] / "results.json").read_text())
    assert report["summary"]["rounds"] == 2


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
