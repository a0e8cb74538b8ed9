"""End to end: `flwr run` in the simulation engine attached to an existing two-node Ray
cluster (a `ray start --head` and a `ray start --address` worker, one CPU each, on this
machine). The SuperLink gets RAY_ADDRESS; the Ray backend's `ray.init()` connects to the
cluster instead of starting its own. Each node has its own Ray temp dir, so each
raylet's logs show which ClientApp actors it ran. Everything started is stopped by PID."""

import json
from pathlib import Path

import pytest

from tests.e2e.flwr_harness import flwr_run, ray_cluster, simulation_superlink, stage_app

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_flwr_run_on_an_existing_two_node_ray_cluster(tmp_path: Path) -> None:
    results = tmp_path / "results"
    app = stage_app(ROOT, tmp_path / "app", ["fedlpt", "README.md"])
    with ray_cluster(tmp_path / "ray-logs", num_workers=1, num_cpus=1) as cluster:
        with simulation_superlink(
            tmp_path / "flwr-home", num_supernodes=3, client_num_cpus=1, ray_address=cluster.address
        ) as fed:
            run = flwr_run(
                app,
                fed,
                run_config={"num-server-rounds": 2, "results-dir": str(results), "batch-size": 64},
                timeout=600,
            )
            # The run's driver did not start a Ray of its own in its private temp dir.
            assert not list(Path(fed.env["RAY_TMPDIR"]).glob("session_*"))
        actors = cluster.actor_logs("ClientAppActor")
        drivers = [list(d.rglob("python-core-driver-*.log")) for d in cluster.node_log_dirs()]
        tasks = cluster.tasks_per_node()  # itself a 2nd driver

    assert run.status == "finished:completed", run.stdout
    # One CPU per node, one CPU per ClientApp: the pool has one actor on each node.
    assert [len(node) for node in actors] == [1, 1], actors
    # ...and both ran ClientApps (`ClientAppActor.run` handles one message).
    runs = [node.get("ClientAppActor.run", 0) for node in tasks]
    assert all(n > 0 for n in runs), tasks
    assert sum(runs) >= 3 * 2, tasks  # 3 train replies in each of 2 rounds
    assert sum(len(d) for d in drivers) == 1, drivers  # flwr-simulation joined as a driver
    rounds = json.loads(next(results.glob("*/results.json")).read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["replies"] == 3 and r["replies-dropped"] == 0 for r in rounds[1:])
