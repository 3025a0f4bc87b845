"""Two torchrun agents on this machine act as two nodes: c10d rendezvous over loopback, world size 2.

Node 1 starts first and is past its own checks before node 0 exists, so the test also shows
that a node which starts before the rendezvous host waits for it instead of failing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

CONFIG = """
[[actions]]
name = "click"
attribution_window = "1h"
value_weight = 1.0

[[sparse_features]]
name = "user"
column = "user_id"
num_embeddings = 64
embedding_dim = 8

[[dense_features]]
column = "position"
normalization = "log1p"

[split]
eval_days = 1

[training]
batch_size = 32
epochs = 1
log_every = 2

[sharding]
memory_budget_gib = 1.0
allowed_sharding_types = ["table_wise"]
"""


def _write_split(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "impression_id": pa.array(np.arange(n) + seed * 10_000, pa.int64()),
            "user_id": pa.array(rng.integers(0, 40, n), pa.int64()),
            "position": pa.array(rng.integers(1, 5, n), pa.int64()),
            "label_click": pa.array((rng.random(n) < 0.3).astype(np.int8)),
            "keep_rate": pa.array(np.ones(n)),
            "weight": pa.array(np.ones(n)),
        }
    )
    pq.write_table(table, folder / "part-0.parquet")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_command(index: int, port: int, run: Path) -> list[str]:
    return [
        sys.executable, "-m", "launch", "node",
        "--nnodes", "2", "--nproc-per-node", "1", "--threads-per-rank", "1",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", "--rdzv-timeout", "300",
        "--node-index", str(index),
        "--",
        "--config", str(run / "config.toml"), "--data", str(run / "data"), "--out", str(run / "model"),
    ]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    _write_split(tmp_path / "data" / "train", 256, seed=1)
    _write_split(tmp_path / "data" / "eval", 64, seed=2)
    (tmp_path / "config.toml").write_text(CONFIG)
    return tmp_path


def test_two_nodes_train_with_world_size_two(run):
    port = _free_port()
    node1 = subprocess.Popen(_node_command(1, port, run), stderr=subprocess.PIPE, text=True)

    # Node 1 logs the torchrun command once its checks pass; only then does node 0 start.
    node1_log = []
    for line in node1.stderr:
        node1_log.append(line)
        if "torch.distributed.run" in line:
            break
    node0 = subprocess.Popen(_node_command(0, port, run), stderr=subprocess.PIPE, text=True)
    node0_log = node0.communicate(timeout=1800)[1]
    node1_log.append(node1.communicate(timeout=1800)[1])
    node1_text = "".join(node1_log)

    assert node0.returncode == 0, node0_log[-4000:]
    assert node1.returncode == 0, node1_text[-4000:]
    assert "--rdzv-backend=c10d" in node1_text
    assert "is_host=false" in node1_text
    assert "is_host=true" in node0_log
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["rows"] == 64


def test_node_mode_reads_torchrun_environment(run):
    # The Kubeflow training operator passes the rendezvous through PET_ variables.
    # A malformed one must stop the node with the variable's name, before torchrun starts.
    env = {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "127.0.0.1:notaport", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "launch", "node", "--", "--config", str(run / "config.toml"),
               "--data", str(run / "data"), "--out", str(run / "model")]

    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    assert result.returncode != 0
    assert "PET_RDZV_ENDPOINT='127.0.0.1:notaport'" in result.stderr
    assert "Traceback" not in result.stderr


def test_node_mode_requires_endpoint(run):
    command = [sys.executable, "-m", "launch", "node", "--nnodes", "2", "--", "--config", str(run / "config.toml"),
               "--data", str(run / "data"), "--out", str(run / "model")]

    result = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=600)

    assert result.returncode == 2
    assert "needs --rdzv-endpoint" in result.stderr
