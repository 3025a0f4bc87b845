"""The trainer's entry points on tiny data: one rank without torchrun, and the CLI checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

CONFIG = """
[[actions]]
name = "click"
attribution_window = "1h"
value_weight = 1.0

[[actions]]
name = "report"
attribution_window = "1d"
value_weight = -50.0

[[sparse_features]]
name = "user"
column = "user_id"
num_embeddings = {num_embeddings}
embedding_dim = 8

[[dense_features]]
column = "position"
normalization = "log1p"

[split]
eval_days = 1

[training]
batch_size = 64
epochs = 1

[sharding]
memory_budget_gib = {budget}
allowed_sharding_types = ["table_wise"]
"""


def _write_split(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "impression_id": pa.array(np.arange(n) + seed * 10_000, pa.int64()),
            "user_id": pa.array(rng.integers(0, 50, n), pa.int64()),
            "position": pa.array(rng.integers(1, 5, n), pa.int64()),
            "label_click": pa.array((rng.random(n) < 0.3).astype(np.int8)),
            # No report at all: its tower trains on negatives only and its AUC is undefined.
            "label_report": pa.array(np.zeros(n, dtype=np.int8)),
            "keep_rate": pa.array(np.ones(n)),
            "weight": pa.array(np.ones(n)),
        }
    )
    pq.write_table(table, folder / "part-0.parquet")


@pytest.fixture
def data(tmp_path):
    _write_split(tmp_path / "data" / "train", 300, seed=1)
    _write_split(tmp_path / "data" / "eval", 101, seed=2)
    return tmp_path


def _config(tmp_path: Path, num_embeddings: int = 100, budget: float = 1.0) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(num_embeddings=num_embeddings, budget=budget))
    return path


def _run_trainer(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainer.train", "--config", str(config), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    return subprocess.run(command, capture_output=True, text=True)


def test_single_rank_run_writes_strict_json(data):
    result = _run_trainer(data, _config(data))

    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((data / "out" / "metrics.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert metrics["world_size"] == 1
    assert metrics["rows"] == 101
    assert metrics["actions"]["report"]["auc"] is None
    assert metrics["actions"]["click"]["auc"] is not None
    assert "no positive in the training split" in result.stderr


def test_table_over_budget_fails_clearly(data):
    # 4M rows x 8 floats = 128 MB against a budget of about 10 MB.
    result = _run_trainer(data, _config(data, num_embeddings=4_000_000, budget=0.01))

    assert result.returncode == 2
    assert "do not fit sharding.memory_budget_gib = 0.01" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_train_rejects_missing_data(tmp_path):
    command = [sys.executable, "-m", "valuerank.cli", "train", "--config", str(_config(tmp_path)), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")]

    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == 2
    assert "missing train/ folder" in result.stderr


def test_cli_unknown_command_named():
    result = subprocess.run([sys.executable, "-m", "valuerank.cli", "trian"], capture_output=True, text=True)

    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr


def test_output_inside_data_rejected(data):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(_config(data)), "--data", str(data / "data"), "--out", str(data / "data" / "train" / "model")],
        capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 2
    assert "is inside the data input" in result.stderr
    assert not (data / "data" / "train" / "model").exists()


def test_output_with_foreign_files_rejected(data):
    (data / "out").mkdir()
    (data / "out" / "notes.txt").write_text("keep me")

    result = _run_trainer(data, _config(data))

    assert result.returncode == 2
    assert "is not an earlier train output" in result.stderr
    assert (data / "out" / "notes.txt").read_text() == "keep me"


def test_rerun_replaces_earlier_outputs(data):
    first = _run_trainer(data, _config(data))
    stale = data / "out" / "tensorboard" / "stale.tfevents"
    stale.write_text("")

    second = _run_trainer(data, _config(data))

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert not stale.exists()
    assert (data / "out" / "metrics.json").exists()


def test_cli_train_rejects_missing_column(data):
    config = _config(data)
    config.write_text(config.read_text().replace('column = "position"', 'column = "slot"'))
    command = [sys.executable, "-m", "valuerank.cli", "train", "--config", str(config), "--data", str(data / "data"), "--out", str(data / "out")]

    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == 2
    assert "missing column 'slot'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("column", "wanted"), [("user_id", "integer ids"), ("position", "numbers")])
def test_cli_train_rejects_text_column(data, column, wanted):
    path = data / "data" / "train" / "part-0.parquet"
    table = pq.read_table(path)
    index = table.column_names.index(column)
    pq.write_table(table.set_column(index, column, pc.cast(table[column], pa.string())), path)
    command = [sys.executable, "-m", "valuerank.cli", "train", "--config", str(_config(data)), "--data", str(data / "data"), "--out", str(data / "out")]

    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == 2
    assert f"column {column!r} has type string" in result.stderr
    assert wanted in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_curve_per_epoch(data):
    command = [
        sys.executable, "-m", "trainer.train", "--config", str(_config(data)), "--data", str(data / "data"),
        "--out", str(data / "out"), "--override", "training.epochs=3",
    ]
    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((data / "out" / "metrics.json").read_text())
    points = metrics["eval_history"]
    assert [p["epoch"] for p in points] == [0, 1, 2]
    assert [p["step"] for p in points] == sorted({p["step"] for p in points})
    assert points[-1]["log_loss"]["click"] == metrics["actions"]["click"]["log_loss"]
    assert (data / "out" / "plots" / "training_curve.png").stat().st_size > 0
