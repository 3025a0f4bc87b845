"""Unit tests of the trainer's pieces: loss, keep-rate correction, hashing, batching."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launch.local import threads_per_rank, torchrun_command
from trainer.data import DataError, SplitData
from trainer.loss import multitask_loss
from trainer.metrics import action_metrics, correct_for_keep_rates, keep_rates_for_rows
from valuerank.config import SparseFeature, config_from_dict
from valuerank.hashing import bucketize_ids


def _config(**training):
    return config_from_dict(
        {
            "actions": [
                {"name": "click", "attribution_window": "1h", "value_weight": 1.0},
                {"name": "buy", "attribution_window": "1d", "value_weight": 10.0},
            ],
            "sparse_features": [
                {"name": "user", "column": "user_id", "num_embeddings": 100},
                {"name": "tags", "column": "tags", "num_embeddings": 50},
            ],
            "dense_features": [{"column": "price", "normalization": "log1p"}],
            "split": {"eval_days": 1},
            "training": training,
        }
    )


def test_loss_without_eligible_rows_is_finite():
    logits = torch.zeros(4, 2, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0]] * 4)
    mask = torch.tensor([[1.0, 0.0]] * 4)

    total, per_action = multitask_loss(logits, labels, mask, torch.ones(4, 2), torch.ones(2))
    total.backward()

    assert torch.isfinite(total)
    assert per_action[1] == 0
    assert torch.isfinite(logits.grad).all()


def test_loss_is_weighted_mean_bce():
    logits = torch.tensor([[0.0], [2.0]])
    labels = torch.tensor([[1.0], [0.0]])
    weights = torch.tensor([[1.0], [3.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")

    total, _ = multitask_loss(logits, labels, torch.ones(2, 1), weights, torch.tensor([2.0]))

    assert torch.isclose(total, 2.0 * (bce * weights).sum() / 4.0)


def test_correction_inverts_negative_downsampling():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.001, 0.2, 1000)
    keep_negative = 0.1
    q = p / (p + (1 - p) * keep_negative)

    corrected = correct_for_keep_rates(q, np.ones_like(q), np.full_like(q, keep_negative))

    assert np.allclose(corrected, p)


def test_correction_is_identity_without_downsampling():
    q = np.array([0.01, 0.5, 0.9])
    assert np.allclose(correct_for_keep_rates(q, np.ones(3), np.ones(3)), q)


def test_keep_rates_by_stratum_value():
    rates = {"click": {"feed": {"positive": 1.0, "negative": 0.2}, "search": {"positive": 1.0, "negative": 0.5}}}
    values = np.array(["feed", "search", "feed"])

    keep_positive, keep_negative = keep_rates_for_rows(rates, "click", values, 3)

    assert keep_negative.tolist() == [0.2, 0.5, 0.2]
    assert keep_positive.tolist() == [1.0, 1.0, 1.0]


def test_metrics_single_class_gives_nan_auc():
    labels = np.zeros(10)
    result = action_metrics(labels, np.full(10, 0.1), np.full(10, 0.1))
    assert np.isnan(result["auc"])


def test_hashing_spreads_large_ids_into_table():
    feature = SparseFeature(name="user", column="user_id", num_embeddings=1000)
    ids = np.array([0, 999, 1000, 10**15, -5], dtype=np.int64)

    rows = bucketize_ids(ids, feature)

    assert ((rows >= 0) & (rows < 1000)).all()
    assert len(set(rows.tolist())) == len(ids)


def test_strict_ids_outside_table_rejected():
    feature = SparseFeature(name="item", column="item_id", num_embeddings=10, hashing=False)
    with pytest.raises(ValueError, match="id 10 is outside"):
        bucketize_ids(np.array([3, 10]), feature)


def _write_split(path, rows: dict) -> None:
    path.mkdir(parents=True)
    pq.write_table(pa.table(rows), path / "part-0.parquet")


def _split_rows(n: int) -> dict:
    return {
        "impression_id": pa.array(np.arange(n), pa.int64()),
        "user_id": pa.array([i if i % 4 else None for i in range(n)], pa.int64()),
        "tags": pa.array([[1, 2], None, [], [3]] * (n // 4), pa.list_(pa.int64())),
        "price": pa.array(np.linspace(0, 10, n)),
        "label_click": pa.array([1, 0] * (n // 2), pa.int8()),
        "label_buy": pa.array([0, None] * (n // 2), pa.int8()),
        "weight": pa.array(np.ones(n)),
        "keep_rate": pa.array(np.ones(n)),
    }


def test_batches_build_jagged_ids_from_lists(tmp_path):
    _write_split(tmp_path / "train", _split_rows(8))
    data = SplitData(tmp_path / "train", _config())

    batch = data.make_batch(np.arange(4))

    assert batch.sparse["user"].lengths().tolist() == [0, 1, 1, 1]
    assert batch.sparse["tags"].lengths().tolist() == [2, 0, 0, 1]
    assert batch.label_mask[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert batch.dense.shape == (4, 1)


def test_train_batches_equal_across_ranks(tmp_path):
    _write_split(tmp_path / "train", _split_rows(40))
    data = SplitData(tmp_path / "train", _config())

    counts = [len(list(data.train_batches(0, rank, 3, 4, seed=0))) for rank in range(3)]

    assert counts == [data.num_train_batches(3, 4)] * 3


def test_eval_batches_cover_each_row_once(tmp_path):
    _write_split(tmp_path / "eval", _split_rows(36))
    data = SplitData(tmp_path / "eval", _config())

    seen = []
    steps = []
    for rank in range(5):
        batches = list(data.eval_batches(rank, 5, 3))
        steps.append(len(batches))
        for batch in batches:
            seen += [i for i in batch.row_index.tolist() if i >= 0]

    assert sorted(seen) == list(range(36))
    assert len(set(steps)) == 1


def test_missing_feature_column_named(tmp_path):
    rows = _split_rows(8)
    del rows["tags"]
    _write_split(tmp_path / "train", rows)

    with pytest.raises(DataError, match="missing column 'tags'"):
        SplitData(tmp_path / "train", _config())


def test_threads_per_rank_splits_cores():
    assert threads_per_rank(2, cores=16) == 8
    assert threads_per_rank(4, cores=2) == 1


def test_torchrun_command_is_standalone():
    command = torchrun_command(2, ["--config", "c.toml"])
    assert "--standalone" in command
    assert command[-2:] == ["--config", "c.toml"]


def test_label_column_as_feature_rejected():
    from valuerank.config import ConfigError

    with pytest.raises(ConfigError, match=r"dense_features\[0\].column: 'label_click' is a label"):
        config_from_dict(
            {
                "actions": [{"name": "click", "attribution_window": "1h"}],
                "sparse_features": [{"name": "user", "column": "user_id", "num_embeddings": 10}],
                "dense_features": [{"column": "label_click"}],
                "split": {"eval_days": 1},
            }
        )
