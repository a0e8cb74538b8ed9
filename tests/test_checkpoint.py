"""Checkpoints: a resumed run ends exactly as an uninterrupted one; bad resumes are named."""

from pathlib import Path

import pytest
import torch

from fedlpt.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError
from fedlpt.client_app import app as client_app
from fedlpt.config import default_run_config
from fedlpt.inprocess import LocalGrid
from fedlpt.server_app import run_server

FAST = {"model": "mlp", "batch-size": 64, "num-server-rounds": 4, "strategy.name": "fedadam"}


def grid(config: dict) -> LocalGrid:
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    return LocalGrid(client_app, nodes, config)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed-s"} for r in rows]


def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    base = {**default_run_config(), **FAST}
    straight_config = {**base, "results-dir": str(tmp_path / "straight")}
    straight = run_server(grid(straight_config), straight_config)

    config = {**base, "results-dir": str(tmp_path / "resumed")}
    # The same nodes (a SuperNode keeps its state while the ServerApp restarts).
    nodes = grid(config)
    first = run_server(nodes, {**config, "num-server-rounds": 2})
    folder = first.recorder.folder
    resumed = run_server(nodes, {**config, "resume-from": str(folder)})

    assert resumed.recorder.folder == folder
    final, expected = resumed.arrays.to_torch_state_dict(), straight.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert comparable(resumed.recorder.rows) == comparable(straight.recorder.rows)
    assert Checkpoint.load(folder).server_round == 4


def test_resuming_needs_a_checkpoint_and_the_same_run(tmp_path: Path) -> None:
    config = {**default_run_config(), **FAST, "num-server-rounds": 1}
    config["results-dir"] = str(tmp_path)
    done = run_server(grid(config), config)
    folder = str(done.recorder.folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_server(grid(config), {**config, "resume-from": str(tmp_path / "nope")})
    with pytest.raises(CheckpointError, match=r"differs .* in bits: 8 -> 6"):
        run_server(grid(config), {**config, "bits": 6, "resume-from": folder})
    with pytest.raises(CheckpointError, match="leaves nothing to do"):
        run_server(grid(config), {**config, "resume-from": folder})
    (done.recorder.folder / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        run_server(grid(config), {**config, "num-server-rounds": 2, "resume-from": folder})
