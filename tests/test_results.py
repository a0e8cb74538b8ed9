"""The results folder: written after every round, atomically, and whole at the end."""

import json
from pathlib import Path

import torch

from fedlpt.config import AppConfig, default_run_config
from fedlpt.inprocess import simulate
from fedlpt.results import RunRecorder, write_atomically
from fedlpt.strategy.base import DroppedReply
from fedlpt.strategy.traffic import RoundTraffic

FAST = {"model": "mlp", "num-server-rounds": 2, "batch-size": 64}


def test_a_run_leaves_json_csv_plots_and_the_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLPT_RESULTS_DIR", str(tmp_path))
    outcome = simulate(FAST, 2, write_results=True)
    folder = outcome.recorder.folder
    assert folder.parent == tmp_path
    report = json.loads((folder / "results.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["rounds"][2]["cumulative-mb"] > report["rounds"][1]["cumulative-mb"] > 0
    assert report["config"]["bits"] == 8 and report["summary"]["rounds"] == 2
    assert report["train-metrics"]["1"]["bits"] == 8
    assert report["run"]["clients"] == 2 and report["run"]["versions"]["flwr"]
    assert report["summary"]["precision"] == "8-bit"
    assert set(report["nodes"]) == {"101", "102"}
    assert (folder / "metrics.csv").read_text().startswith("round,accuracy,loss,train-loss,")
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "accuracy.svg").read_text().lstrip().startswith("<?xml")
    model = torch.load(folder / "model.pt", weights_only=True)
    assert set(model) == set(outcome.arrays.to_torch_state_dict())


def test_every_round_is_on_disk_as_soon_as_it_is_recorded(tmp_path: Path) -> None:
    cfg = AppConfig.from_run_config(default_run_config())
    recorder = RunRecorder(cfg, default_run_config(), folder=tmp_path / "run")
    recorder.record_round(0, 0.1, 2.3)
    dropped = [DroppedReply(1, 7, "bad manifest", by="codec")]
    recorder.record_round(1, 0.5, 1.1, RoundTraffic(1, bytes_up=10, bytes_down=30), dropped)
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["replies-dropped"] == 1
    assert report["dropped"] == {"1": ["node 7: bad manifest"]}
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3


def test_an_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_atomically(target, b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
