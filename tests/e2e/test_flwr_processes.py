"""End to end through real Flower processes: `flwr run` in the simulation engine, and a
SuperLink with SuperNodes (one of them a 4-bit device). Each test has its own FLWR_HOME,
ports and Ray directory and stops every process it started."""

import json
from pathlib import Path

import pytest

from tests.e2e.flwr_harness import deployment_federation, flwr_run, simulation_superlink, stage_app

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def staged_app(tmp_path: Path) -> Path:
    # Only what the FAB needs: building it from the repo root would walk .venv.
    return stage_app(ROOT, tmp_path / "app", ["fedlpt", "README.md"])


def only_run_folder(results: Path) -> Path:
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_flwr_run_simulation_trains_and_writes_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=3) as fed:
        run = flwr_run(
            staged_app(tmp_path),
            fed,
            run_config={"num-server-rounds": 2, "results-dir": str(results), "batch-size": 64},
            timeout=600,
        )
    assert run.status == "finished:completed", run.stdout
    folder = only_run_folder(results)
    figures = [f"accuracy.{suffix}" for suffix in ("png", "svg", "pdf")]
    for name in ("results.json", "metrics.csv", "model.pt", "checkpoint.pt", *figures):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "results.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["replies"] == 3 and r["replies-dropped"] == 0 for r in rounds[1:])
    # Three 8-bit uploads are about 4x smaller than the three FP32 downloads.
    assert 3.5 < rounds[1]["bytes-down"] / rounds[1]["bytes-up"] < 4.1
    assert "fedlpt: digits / convnet / fedavg, 8-bit BFP" in run.stdout


def test_superlink_with_supernodes_accepts_a_heterogeneous_4_bit_device(tmp_path: Path) -> None:
    results = tmp_path / "results"
    nodes = [
        {"partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2, "bits": 4},
    ]
    with deployment_federation(tmp_path / "flwr-home", 2, nodes) as fed:
        run = flwr_run(
            staged_app(tmp_path),
            fed,
            run_config={
                "num-server-rounds": 1,
                "results-dir": str(results),
                "strategy.name": "fedprox",
                "strategy.fedprox.proximal-mu": 0.01,
                "compress": "zstd",  # the SuperNodes have zstandard: coded where it shrinks
            },
            timeout=600,
        )
    assert run.status == "finished:completed", run.stdout
    report = json.loads((only_run_folder(results) / "results.json").read_text())
    round1 = report["rounds"][1]
    assert round1["replies"] == 2 and round1["replies-dropped"] == 0
    bits = report["train-metrics"]["1"]["bits"]
    assert 4 < bits < 8  # example-weighted mean of an 8-bit and a 4-bit node
    # One 8-bit and one 4-bit upload: (1/4 + 1/8) of two FP32 models, about 0.19, less
    # what zstd saves on codes one round away from a uniform initialization (little).
    assert 0.10 < round1["bytes-up"] / round1["bytes-down"] < 0.22
