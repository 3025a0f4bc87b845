"""The sweep command: grid and random points, the validation split, and one result row per configuration."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.dataset as ds
import pytest

from tiny_ranking_data import write_config, write_splits
from trainer.sweep import SweepError, carve_validation, grid_points, overrides_for, parse_param, run_sweep
from valuerank.config import ConfigError, load_config


@pytest.fixture
def tiny(tmp_path):
    return write_splits(tmp_path), write_config(tmp_path)


def test_grid_sweep_writes_row_per_configuration(tiny, tmp_path):
    data_dir, config = tiny
    space = {"training.dense_lr": [0.003, 0.03], "model.tower_layers": [[8]]}

    rows = run_sweep(config, data_dir, tmp_path / "sweep", space, validation_days=1.0, nproc_per_node=1)

    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    with open(tmp_path / "sweep" / "results.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert sorted(row["training.dense_lr"] for row in saved["trials"]) == ["0.003", "0.03"]
    assert len(csv_rows) == 2
    assert all(0.0 <= row["ndcg"] <= 1.0 for row in rows)
    assert "validation rows from" in saved["scored_on"]
    assert saved["trials"][0]["ndcg"] >= saved["trials"][1]["ndcg"]


def test_random_points_distinct_and_seeded():
    space = {"a": [1, 2], "b": [3, 4], "c": [5, 6]}

    first = grid_points(space, "random", trials=3, seed=7)
    second = grid_points(space, "random", trials=3, seed=7)

    assert len(first) == 3
    assert len({json.dumps(point, sort_keys=True) for point in first}) == 3
    assert first == second


def test_grid_points_cover_product():
    points = grid_points({"a": [1, 2], "b": [3, 4, 5]}, "grid", trials=None, seed=0)

    assert len(points) == 6


def test_embedding_dim_sets_every_feature(tiny):
    _, config = tiny
    cfg = load_config(config)

    overrides = overrides_for({"embedding_dim": 12, "model.tower_layers": [32, 16]}, cfg)
    swept = load_config(config, overrides)

    assert [f.embedding_dim for f in swept.sparse_features] == [12, 12]
    assert swept.model.tower_layers == [32, 16]


def test_validation_split_cut_by_time(tiny, tmp_path):
    data_dir, _ = tiny

    carved = carve_validation(data_dir, tmp_path / "carved", days=1.0)

    train = ds.dataset(str(tmp_path / "carved" / "train")).to_table()
    validation = ds.dataset(str(tmp_path / "carved" / "eval")).to_table()
    source = ds.dataset(str(data_dir / "train")).to_table()
    assert train.num_rows + validation.num_rows == source.num_rows
    assert train["timestamp"].to_numpy().max() < validation["timestamp"].to_numpy().min()
    assert carved["rows"]["eval"] == validation.num_rows
    assert np.intersect1d(train["impression_id"].to_numpy(), validation["impression_id"].to_numpy()).size == 0


def test_validation_days_covering_everything_rejected(tiny, tmp_path):
    data_dir, _ = tiny

    with pytest.raises(SweepError, match="choose --validation-days"):
        carve_validation(data_dir, tmp_path / "carved", days=30.0)


def test_bad_key_fails_before_training(tiny, tmp_path):
    data_dir, config = tiny

    with pytest.raises(ConfigError, match="tower_layer"):
        run_sweep(config, data_dir, tmp_path / "sweep", {"model.tower_layer": [[8]]})
    assert not (tmp_path / "sweep").exists()


def test_param_needs_toml_array():
    with pytest.raises(SweepError, match="TOML array"):
        parse_param("training.dense_lr=0.001,0.01")
