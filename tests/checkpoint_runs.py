"""Tiny data, configs and trainer launches shared by the checkpoint, export and elastic tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

CONFIG = """
[[actions]]
name = "click"
attribution_window = "1h"
value_weight = 1.0

[[actions]]
name = "buy"
attribution_window = "1d"
value_weight = 5.0

[[sparse_features]]
name = "user"
column = "user_id"
num_embeddings = 1000
embedding_dim = 8

[[sparse_features]]
name = "item"
column = "item_id"
num_embeddings = 500
embedding_dim = 8

[[dense_features]]
column = "position"
normalization = "log1p"

[split]
eval_days = 1

[training]
batch_size = {batch_size}
epochs = {epochs}
checkpoint_every_steps = {every}
keep_last_checkpoints = {keep}
log_every = 5

[sharding]
memory_budget_gib = 1.0
"""


def write_config(path: Path, batch_size: int = 64, epochs: int = 2, every: int = 10, keep: int = 100) -> Path:
    path.write_text(CONFIG.format(batch_size=batch_size, epochs=epochs, every=every, keep=keep))
    return path


def _write_split(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "impression_id": pa.array(np.arange(n) + seed * 1_000_000, pa.int64()),
            "user_id": pa.array(rng.integers(0, 500, n), pa.int64()),
            "item_id": pa.array(rng.integers(0, 300, n), pa.int64()),
            "position": pa.array(rng.integers(1, 5, n), pa.int64()),
            "label_click": pa.array((rng.random(n) < 0.3).astype(np.int8)),
            "label_buy": pa.array((rng.random(n) < 0.1).astype(np.int8)),
            "keep_rate": pa.array(np.ones(n)),
            "weight": pa.array(np.ones(n)),
        }
    )
    pq.write_table(table, folder / "part-0.parquet")


def write_data(root: Path, train_rows: int = 2000, eval_rows: int = 301) -> Path:
    """Write train/ and eval/ splits and a manifest whose click negatives were kept at rate 0.5."""
    _write_split(root / "train", train_rows, seed=1)
    _write_split(root / "eval", eval_rows, seed=2)
    keep_rates = {"click": {"__all__": {"positive": 1.0, "negative": 0.5}}}
    (root / "_manifest.json").write_text(json.dumps({"action_keep_rates": keep_rates}))
    return root


def train_command(ranks: int, config: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    trainer = ["-m", "trainer.train", "--config", str(config), "--data", str(data), "--out", str(out)]
    trainer += [part for override in overrides for part in ("--override", override)]
    if ranks == 1:
        return [sys.executable, *trainer]
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), *trainer]


def run_training(ranks: int, config: Path, data: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the trainer on ``ranks`` CPU ranks (1 without torchrun) and return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = train_command(ranks, config, data, out, *overrides)
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


def copy_checkpoint(source_run: Path, step: int, out: Path) -> Path:
    """Start a training output folder that holds only one checkpoint of another run, as after a crash."""
    name = f"step-{step:08d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(source_run / "_manifest.json", out / "_manifest.json")
    shutil.copytree(source_run / "checkpoints" / name, out / "checkpoints" / name)
    return out


def step_losses(out: Path, rank: int = 0) -> dict[int, float]:
    """Return {step: loss} from one rank's step log."""
    lines = (out / "steps" / f"rank-{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def predictions(out: Path) -> dict[int, np.ndarray]:
    """Return {impression_id: [p_click, p_buy, value_score]} from a run's evaluation predictions."""
    table = pq.read_table(out / "predictions" / "part-0.parquet")
    values = np.stack([table[c].to_numpy() for c in ("p_click", "p_buy", "value_score")], axis=1)
    return dict(zip(table["impression_id"].to_pylist(), values))
