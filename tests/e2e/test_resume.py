"""A ServerApp killed mid-run on a real SuperLink deployment resumes from its checkpoint."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.flwr_harness import (
    FlwrHarnessError,
    deployment_federation,
    flwr_run,
    serverapp_pids,
    stage_app,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def completed_rounds(folder: Path) -> list[int]:
    try:
        report = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["round"] for r in report["rounds"]]


def test_a_killed_server_app_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    app = stage_app(ROOT, tmp_path / "app", ["fedlpt", "README.md"])
    results = tmp_path / "results"
    config = {"results-dir": str(results), "batch-size": 64, "seed": 3}
    with deployment_federation(tmp_path / "flwr-home", 2) as fed:
        first = threading.Thread(
            target=lambda: _ignore_failure(
                lambda: flwr_run(app, fed, {**config, "num-server-rounds": 4}, timeout=600)
            ),
            daemon=True,
        )
        first.start()
        deadline = time.monotonic() + 480
        folder = None
        while time.monotonic() < deadline:
            runs = [p for p in results.glob("*") if p.is_dir()] if results.is_dir() else []
            # Round 1 is done once its checkpoint is written (after its results).
            if runs and (runs[0] / "checkpoint.pt").is_file():
                folder = runs[0]
                break
            time.sleep(0.5)
        assert folder is not None, fed.logs()
        (pid,) = serverapp_pids(fed)
        os.kill(pid, signal.SIGKILL)
        done = completed_rounds(folder)
        assert done[-1] < 4
        first.join(timeout=120)

        resumed = flwr_run(
            app, fed, {**config, "num-server-rounds": 4, "resume-from": str(folder)}, timeout=600
        )
    assert resumed.status == "finished:completed", resumed.stdout
    assert f"resuming {folder} after round" in resumed.stdout
    # Every round exactly once: at most the round in flight was lost and redone.
    assert completed_rounds(folder) == list(range(5))
    assert [p for p in results.iterdir() if p.is_dir()] == [folder]


def _ignore_failure(run) -> None:
    # The run whose ServerApp was killed does not end well.
    with contextlib.suppress(FlwrHarnessError):
        run()
