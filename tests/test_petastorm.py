"""The petastorm reader against the native loader. Runs in .venv-petastorm (``make test`` does that).

In the main environment petastorm is not installed: the comparison tests skip there, and
the test of the error message runs instead.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data import DataError, open_split
from valuerank.config import config_from_dict

HAS_PETASTORM = importlib.util.find_spec("petastorm") is not None
needs_petastorm = pytest.mark.skipif(not HAS_PETASTORM, reason="petastorm is installed only in .venv-petastorm; make test runs these there")


def _config(reader: str, **training):
    return config_from_dict(
        {
            "actions": [
                {"name": "click", "attribution_window": "1h"},
                {"name": "buy", "attribution_window": "1d"},
            ],
            "sparse_features": [
                {"name": "user", "column": "user_id", "num_embeddings": 100},
                {"name": "tags", "column": "tags", "num_embeddings": 50},
            ],
            "dense_features": [{"column": "price", "normalization": "log1p"}],
            "split": {"eval_days": 1},
            "training": {"reader": reader, "loader_workers": 0, **training},
        }
    )


def _tags(i: int) -> list[int] | None:
    """Two tags, an empty list or a NULL list, so both readers see every list shape."""
    if i % 3:
        return [i % 50, i * 3]
    if i % 2:
        return []
    return None


def _buy(i: int) -> int | None:
    if i % 5 == 0:
        return 1
    if i % 7 == 0:
        return None
    return 0


def _rows(first: int, n: int) -> pa.Table:
    ids = np.arange(first, first + n)
    return pa.table(
        {
            "impression_id": pa.array(ids, pa.int64()),
            "user_id": pa.array([int(i * 7919) if i % 11 else None for i in ids], pa.int64()),
            "tags": pa.array([_tags(int(i)) for i in ids], pa.list_(pa.int64())),
            "price": pa.array(ids * 0.5),
            "label_click": pa.array((ids % 2).astype(np.int8)),
            "label_buy": pa.array([_buy(int(i)) for i in ids], pa.int8()),
            "weight": pa.array(np.full(n, 2.0)),
        }
    )


@pytest.fixture
def split(tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    for day, (first, n) in enumerate([(0, 40), (40, 33), (73, 0), (73, 25)]):
        path = folder / f"dt=2024-05-0{day + 1}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(_rows(first, n), path, row_group_size=10)
    (folder / "_SUCCESS").write_text("")
    return folder


def _rows_of_epoch(data, world_size: int, batch_size: int) -> dict[int, tuple]:
    """Map impression_id to (user ids, tag ids, dense, labels, mask, weights) over one epoch of all ranks."""
    rows = {}
    steps = set()
    for rank in range(world_size):
        batches = list(data.train_batches(0, rank, world_size, batch_size, seed=1))
        steps.add(len(batches))
        for batch in batches:
            user_lengths = batch.sparse["user"].lengths().tolist()
            tag_lengths = batch.sparse["tags"].lengths().tolist()
            user_values = iter(batch.sparse["user"].values().tolist())
            tag_values = iter(batch.sparse["tags"].values().tolist())
            for i, position in enumerate(batch.row_index.tolist()):
                user = tuple(next(user_values) for _ in range(user_lengths[i]))
                tags = tuple(next(tag_values) for _ in range(tag_lengths[i]))
                if position < 0:
                    continue
                impression = int(data.impression_id[position])
                assert impression not in rows, f"impression {impression} delivered twice"
                rows[impression] = (
                    user,
                    tags,
                    tuple(np.round(batch.dense[i].tolist(), 5)),
                    tuple(batch.labels[i].tolist()),
                    tuple(batch.label_mask[i].tolist()),
                    tuple(batch.weights[i].tolist()),
                )
    assert len(steps) == 1, f"ranks ran different step counts: {steps}"
    return rows


@needs_petastorm
def test_readers_deliver_same_rows(split):
    native = open_split(split, _config("native"))
    petastorm = open_split(split, _config("petastorm"))

    native_rows = _rows_of_epoch(native, 1, 16)
    petastorm_rows = _rows_of_epoch(petastorm, 1, 16)

    assert len(native_rows) == 98
    assert sorted(native_rows) == sorted(petastorm_rows)
    assert native_rows == petastorm_rows


@needs_petastorm
def test_petastorm_shards_cover_rows_once(split):
    petastorm = open_split(split, _config("petastorm", shuffle_buffer_rows=16))
    native = open_split(split, _config("native"))

    rows = _rows_of_epoch(petastorm, 3, 8)

    assert sorted(rows) == list(range(98))
    assert rows == _rows_of_epoch(native, 1, 8)


@needs_petastorm
def test_petastorm_equal_steps_per_rank(split):
    data = open_split(split, _config("petastorm"))

    counts = [len(list(data.train_batches(0, rank, 2, 8, seed=0))) for rank in range(2)]

    assert counts == [data.num_train_batches(2, 8)] * 2


@needs_petastorm
def test_petastorm_start_batch_matches_epoch(split):
    data = open_split(split, _config("petastorm", shuffle_buffer_rows=16))
    full = [b.row_index.tolist() for b in data.train_batches(1, 0, 2, 8, seed=4)]

    resumed = [b.row_index.tolist() for b in data.train_batches(1, 0, 2, 8, seed=4, start_batch=3)]

    assert resumed == full[3:]


@needs_petastorm
def test_petastorm_eval_counts_rows_once(split):
    data = open_split(split, _config("petastorm"))

    seen = [i for rank in range(2) for b in data.eval_batches(rank, 2, 8) for i in b.row_index.tolist() if i >= 0]

    assert sorted(seen) == list(range(98))


@needs_petastorm
def test_petastorm_too_many_ranks_named(split):
    data = open_split(split, _config("petastorm"))

    with pytest.raises(DataError, match="cannot feed 50 ranks"):
        data.num_train_batches(50, 8)


@pytest.mark.skipif(HAS_PETASTORM, reason="checks the message shown where petastorm is missing")
def test_missing_petastorm_names_environment(split):
    with pytest.raises(DataError, match=r"make petastorm-venv.*\.venv-petastorm"):
        open_split(split, _config("petastorm"))


TRAINER_CONFIG = """
[[actions]]
name = "click"
attribution_window = "1h"

[[actions]]
name = "buy"
attribution_window = "1d"

[[sparse_features]]
name = "user"
column = "user_id"
num_embeddings = 100
embedding_dim = 8

[[sparse_features]]
name = "tags"
column = "tags"
num_embeddings = 50
embedding_dim = 8

[[dense_features]]
column = "price"
normalization = "log1p"

[split]
eval_days = 1

[training]
batch_size = 16
epochs = 1
reader = "petastorm"

[sharding]
allowed_sharding_types = ["table_wise"]
"""


@needs_petastorm
def test_trainer_runs_with_petastorm_reader(split, tmp_path):
    data = tmp_path / "data"
    split.rename(tmp_path / "train_split")
    shutil.copytree(tmp_path / "train_split", data / "train")
    shutil.copytree(tmp_path / "train_split", data / "eval")
    config = tmp_path / "config.toml"
    config.write_text(TRAINER_CONFIG)
    command = [sys.executable, "-m", "trainer.train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "out")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"] == 98
