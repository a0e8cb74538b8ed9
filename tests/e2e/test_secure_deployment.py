"""The secure deployment recipe of docs/deployment.md, on loopback: certificates and node
keys made by the deploy/ scripts, a SuperLink with TLS and SuperNode authentication, two
registered SuperNodes that train a round of fedlpt, and a SuperNode with an unregistered
key that the SuperLink refuses. Every process is stopped by PID."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.flwr_harness import (
    SuperLinkTls,
    deployment_federation,
    flwr_run,
    list_supernodes,
    stage_app,
    start_supernode,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

# Quick on a busy two-core machine: round eagerly (no torch.compile), one thread per
# process, and a subsample of the digits.
QUICK_ENV = {"FEDLPT_EAGER": "1", "OMP_NUM_THREADS": "1"}


def deploy_script(name: str, *args: Path | str) -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_tls_superlink_trains_with_registered_supernodes_and_refuses_others(
    tmp_path: Path,
) -> None:
    certs, keys, results = tmp_path / "certs", tmp_path / "keys", tmp_path / "results"
    deploy_script("make-certs.sh", certs, "superlink.example.org", "192.0.2.10")
    deploy_script("make-node-keys.sh", keys, "device-0", "device-1", "stranger")
    assert (certs / "server.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert (keys / "device-0").stat().st_mode & 0o077 == 0

    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    with deployment_federation(
        tmp_path / "flwr-home",
        2,
        nodes,
        tls=SuperLinkTls.from_dir(certs),
        supernode_keys=[keys / "device-0", keys / "device-1"],
        extra_env=QUICK_ENV,
    ) as fed:
        registered = list_supernodes(fed)
        assert sorted(registered.values()) == ["online", "online"], registered

        # A key that nobody registered: the SuperLink refuses to activate the node, which
        # exits at once (code 305) and never appears among the nodes.
        stranger = start_supernode(
            fed, {"partition-id": 0, "num-partitions": 2}, auth_key=keys / "stranger"
        )
        assert stranger.popen.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in stranger.log_text()
        assert list_supernodes(fed) == registered

        app = stage_app(ROOT, tmp_path / "app", ["fedlpt", "README.md"])
        run = flwr_run(
            app,
            fed,
            run_config={
                "num-server-rounds": 1,
                "batch-size": 64,
                "train-examples": 400,
                "test-examples": 200,
                "results-dir": str(results),
            },
            timeout=240,
        )
    assert run.status == "finished:completed", run.stdout
    assert "SuperNode ID" not in stranger.log_text()
    assert "Receiving: train message" not in stranger.log_text()
    (folder,) = [p for p in results.iterdir() if p.is_dir()]
    report = json.loads((folder / "results.json").read_text())
    round1 = report["rounds"][1]
    assert round1["replies"] == 2 and round1["replies-dropped"] == 0
