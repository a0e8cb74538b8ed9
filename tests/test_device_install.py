"""A device's ClientApp needs only fedlpt's core (flwr, torch, numpy): none of the extras.

The check runs in a fresh interpreter in which every extra's package is shadowed by one
that fails to import, as it would on a board with ``pip install fedlpt`` alone, and trains
one round there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.data.idx_files import write_mnist_like

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["datasets", "flwr_datasets", "sklearn", "matplotlib", "ray", "torchvision", "zstandard"]

DEVICE = """
import json, sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedlpt.client_app import app
from fedlpt.config import default_run_config
from fedlpt.quant.wire import read_manifest
from fedlpt.task import build_model

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
run_config = {{**default_run_config(), "dataset": "fmnist", "data-dir": {data!r},
              "partitioner": "dirichlet-balanced", "alpha": 0.5, "batch-size": 16}}
context = Context(run_id=1, node_id=7, node_config={{"partition-id": 0, "num-partitions": 2}},
                  state=RecordDict(), run_config=run_config)
config = ConfigRecord({{"server-round": 1, "fedlpt.upload.bits": 8,
                       "fedlpt.upload.block": "row", "fedlpt.upload.rounding": "stochastic"}})
content = RecordDict({{"arrays": ArrayRecord(build_model("fmnist", "convnet").state_dict()),
                      "config": config}})
message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
message.metadata.__dict__["_message_id"] = "m1"
reply = app(message, context)
loaded = sorted(m for m in {extras!r} if m in sys.modules)
bits = sorted({{e["bits"] for e in read_manifest(reply.content["arrays"])}})
examples = reply.content["metrics"]["num-examples"]
print(json.dumps({{"loaded": loaded, "bits": bits, "examples": examples}}))
"""


def test_the_client_app_trains_a_round_with_the_core_install_only(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "fmnist", train=64, test=16)
    shadows = tmp_path / "not-installed"
    for name in EXTRAS:
        (shadows / name).mkdir(parents=True)
        (shadows / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r} (not on this device)")\n'
        )
    code = DEVICE.format(extras=EXTRAS, data=str(tmp_path / "fmnist"))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": f"{shadows}{os.pathsep}{ROOT}"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "bits": [8], "examples": 32}
