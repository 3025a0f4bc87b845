"""Baselines and the comparison report: same rows as the trainer, encodings, and the written table."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest

from tiny_ranking_data import write_config, write_splits
from trainer.baselines.features import SplitArrays, TargetEncoder, collect_split, wide_matrix
from trainer.baselines.models import XGBoostSettings
from trainer.baselines.run import run_baselines
from trainer.comparison import ComparisonError, run_comparison
from trainer.data import SplitData
from valuerank.config import load_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trainer run (1 rank) and both baselines on the same tiny splits."""
    root = tmp_path_factory.mktemp("baselines")
    data_dir = write_splits(root)
    config = write_config(root)
    command = [sys.executable, "-m", "trainer.train", "--config", str(config), "--data", str(data_dir), "--out", str(root / "model"), "--override", "training.epochs=5"]
    trained = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    cfg = load_config(config)
    results = run_baselines(cfg, data_dir, root / "baselines", xgboost=XGBoostSettings(max_rounds=50, threads=1))
    return root, cfg, results


def _impression_ids(folder):
    return np.sort(ds.dataset(str(folder / "predictions"), format="parquet").to_table()["impression_id"].to_numpy())


@pytest.mark.parametrize("name", ["logistic", "xgboost"])
def test_baseline_scores_model_rows(runs, name):
    root, _, results = runs
    model_metrics = json.loads((root / "model" / "metrics.json").read_text())

    assert results[name]["rows"] == model_metrics["rows"]
    assert np.array_equal(_impression_ids(root / "baselines" / name), _impression_ids(root / "model"))
    for action in ("click", "like", "hate"):
        assert results[name]["actions"][action]["rows"] == model_metrics["actions"][action]["rows"], action


@pytest.mark.parametrize("name", ["logistic", "xgboost"])
def test_baseline_learns_like(runs, name):
    _, _, results = runs

    assert results[name]["actions"]["like"]["auc"] > 0.7
    assert 0.0 <= results[name]["value_score"]["ranking"]["ndcg"] <= 1.0


def test_baseline_metrics_json_is_strict(runs):
    root, _, _ = runs

    metrics = json.loads((root / "baselines" / "xgboost" / "metrics.json").read_text(), parse_constant=pytest.fail)

    assert metrics["model"] == "xgboost"
    assert (root / "baselines" / "xgboost" / "plots" / "boosting_curves.png").stat().st_size > 0
    assert (root / "baselines" / "logistic" / "plots" / "calibration.png").stat().st_size > 0
    assert list((root / "baselines" / "logistic" / "tensorboard").glob("events.out.tfevents.*"))


def test_comparison_writes_table_and_plots(runs):
    root, cfg, _ = runs
    folders = {"shared_bottom": root / "model", "logistic": root / "baselines" / "logistic", "xgboost": root / "baselines" / "xgboost"}

    table = run_comparison(folders, root / "comparison")

    markdown = (root / "comparison" / "comparison.md").read_text()
    saved = json.loads((root / "comparison" / "comparison.json").read_text())
    assert list(saved["runs"]) == ["shared_bottom", "logistic", "xgboost"]
    for name in folders:
        assert f"| {name} |" in markdown, name
    assert "| random order |" in markdown
    assert table["runs"]["logistic"]["ndcg"]["ndcg"] == pytest.approx(json.loads((folders["logistic"] / "metrics.json").read_text())["value_score"]["ranking"]["ndcg"])
    for action in cfg.actions:
        assert (root / "comparison" / "plots" / f"reliability_{action.name}.png").stat().st_size > 0, action.name


def test_comparison_rejects_different_rows(runs, tmp_path):
    root, cfg, _ = runs
    other = write_splits(tmp_path / "other", eval_rows=150)
    run_baselines(cfg, other, tmp_path / "other_baselines", models=["logistic"])

    with pytest.raises(ComparisonError, match="differ from"):
        run_comparison({"model": root / "model", "other": tmp_path / "other_baselines" / "logistic"}, tmp_path / "comparison")


def test_collect_split_keeps_row_order(runs):
    root, cfg, _ = runs
    data = SplitData(root / "data" / "eval", cfg)

    arrays = collect_split(data, cfg, batch_size=7)

    assert arrays.num_rows == data.num_rows
    assert np.array_equal(arrays.labels, data.labels)


def _arrays(ids: list[list[int]], labels: list[float]) -> SplitArrays:
    lengths = [len(row) for row in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.array([i for row in ids for i in row], dtype=np.int64)
    n = len(ids)
    label_array = np.array(labels, dtype=np.float32)[:, None].repeat(3, axis=1)
    return SplitArrays(
        dense=np.zeros((n, 1), dtype=np.float32),
        sparse={"user": (offsets, values), "item": (np.arange(n + 1, dtype=np.int64), np.zeros(n, dtype=np.int64))},
        labels=label_array,
        label_mask=np.ones_like(label_array),
        weights=np.ones(n),
    )


def test_target_encoding_leaves_out_own_label(runs):
    _, cfg, _ = runs
    # User 5 appears once, so out of fold it is unknown: count 0 and the prior rate.
    train = _arrays([[5]] + [[1]] * 40, [1.0] + [0.0] * 40)
    encoder = TargetEncoder(cfg, folds=2, smoothing=4.0)

    encoded = encoder.fit_transform(train)

    names = encoder.feature_names()
    assert encoded[0, names.index("user_count")] == 0.0
    assert encoded[0, names.index("user_rate_like")] == pytest.approx(encoder.prior[1])


def test_target_encoding_new_split(runs):
    _, cfg, _ = runs
    train = _arrays([[5], [5], [5], [1]], [1.0, 1.0, 0.0, 0.0])
    encoder = TargetEncoder(cfg, folds=2, smoothing=4.0)
    encoder.fit_transform(train)

    encoded = encoder.transform(_arrays([[5], [9], []], [0.0, 0.0, 0.0]))

    names = encoder.feature_names()
    prior = 2 / 4
    assert encoded[0, names.index("user_count")] == 3.0
    assert encoded[0, names.index("user_rate_click")] == pytest.approx((2 + 4 * prior) / (3 + 4))
    assert encoded[1, names.index("user_rate_click")] == pytest.approx(prior)
    assert np.isnan(encoded[2, names.index("user_rate_click")])


def test_wide_matrix_one_hot_and_mean_pooling(runs):
    cfg = copy.deepcopy(runs[1])
    arrays = _arrays([[3, 3, 7], [2]], [0.0, 1.0])
    cfg.sparse_features[0].pooling = "mean"

    matrix = wide_matrix(arrays, cfg).toarray()

    assert matrix.shape == (2, 64 + 128 + 1)
    assert matrix[0, 3] == pytest.approx(2 / 3)
    assert matrix[0, 7] == pytest.approx(1 / 3)
    assert matrix[1, 2] == 1.0
    assert matrix[0, 64] == 1.0


def test_cli_compare_reports_missing_run(tmp_path):
    command = [sys.executable, "-m", "valuerank.cli", "compare", "--run", f"model={tmp_path / 'none'}", "--out", str(tmp_path / "out")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 2
    assert "metrics.json not found" in result.stderr
    assert "Traceback" not in result.stderr
