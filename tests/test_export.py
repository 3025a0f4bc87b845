"""Export a 2-rank sharded checkpoint to one file, load it without a process group, and score."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from checkpoint_runs import REPO, predictions, run_training, write_config, write_data


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "valuerank.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_data(root / "data")
    config = write_config(root / "config.toml", epochs=1)
    model_dir = root / "model"
    trained = run_training(2, config, data, model_dir)
    assert trained.returncode == 0, trained.stderr[-3000:]

    artifact = root / "model.pt"
    export = _cli("export", "--model", str(model_dir), "--out", str(artifact))
    assert export.returncode == 0, export.stderr[-3000:]
    scores = root / "scores.parquet"
    score = _cli("score", "--model", str(artifact), "--impressions", str(data / "eval"), "--out", str(scores))
    assert score.returncode == 0, score.stderr[-3000:]
    return {"model_dir": model_dir, "artifact": artifact, "scores": scores}


def test_export_loads_weights_only(exported):
    artifact = torch.load(exported["artifact"], weights_only=True)

    assert not torch.distributed.is_initialized()
    assert artifact["trained_world_size"] == 2
    assert artifact["action_keep_rates"]["click"]["__all__"]["negative"] == 0.5
    assert artifact["config"]["sparse_features"][0]["name"] == "user"
    assert set(artifact["dense_stats"]) == {"mean", "std"}


def test_export_holds_unsharded_tables(exported):
    state = torch.load(exported["artifact"], weights_only=True)["state_dict"]

    assert tuple(state["ebc.embedding_bags.t_user.weight"].shape) == (1000, 8)
    assert tuple(state["ebc.embedding_bags.t_item.weight"].shape) == (500, 8)
    assert type(state["ebc.embedding_bags.t_user.weight"]) is torch.Tensor


def test_scores_equal_distributed_predictions(exported):
    expected = predictions(exported["model_dir"])
    table = pq.read_table(exported["scores"])
    got = dict(zip(table["impression_id"].to_pylist(), np.stack([table[c].to_numpy() for c in ("p_click", "p_buy", "value_score")], axis=1)))

    assert sorted(got) == sorted(expected)
    # Pooled sums add the same float32 numbers in another order on the sharded model.
    worst = max(float(np.abs(got[key] - expected[key]).max()) for key in expected)
    assert worst <= 1e-6, f"largest difference between exported and distributed scores: {worst}"


def test_score_rejects_missing_column(exported, tmp_path):
    impressions = tmp_path / "impressions.parquet"
    pq.write_table(pq.read_table(exported["scores"]).drop_columns(["user_id"]), impressions)

    result = _cli("score", "--model", str(exported["artifact"]), "--impressions", str(impressions), "--out", str(tmp_path / "s.parquet"))

    assert result.returncode == 2
    assert "missing column 'user_id'" in result.stderr


def test_export_without_checkpoint_fails_clearly(tmp_path):
    result = _cli("export", "--model", str(tmp_path), "--out", str(tmp_path / "model.pt"))

    assert result.returncode == 2
    assert "no complete checkpoint found" in result.stderr


def test_score_rejects_output_inside_input(exported, tmp_path):
    folder = tmp_path / "impressions"
    folder.mkdir()
    pq.write_table(pq.read_table(exported["scores"]), folder / "part-0.parquet")

    result = _cli("score", "--model", str(exported["artifact"]), "--impressions", str(folder), "--out", str(folder / "scores.parquet"))

    assert result.returncode == 2
    assert "inside the impressions being scored" in result.stderr


def test_score_rejects_file_that_is_not_export(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a model")

    result = _cli("score", "--model", str(junk), "--impressions", str(tmp_path), "--out", str(tmp_path / "s.parquet"))

    assert result.returncode == 2
    assert "is not a valuerank export" in result.stderr
    assert "Traceback" not in result.stderr
