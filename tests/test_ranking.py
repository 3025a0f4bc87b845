"""Value-score NDCG: hand-computed cases, negative gains, ties, skipped groups, and user-day groups."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.ranking import RankingDataError, group_keys, ndcg_by_group, realised_value, value_ndcg
from valuerank.config import config_from_dict

LOG3 = math.log2(3)


def _config(**evaluation) -> object:
    return config_from_dict(
        {
            "actions": [
                {"name": "like", "attribution_window": "1h", "value_weight": 5.0},
                {"name": "hate", "attribution_window": "1h", "value_weight": -50.0},
            ],
            "sparse_features": [{"name": "user", "column": "user_id", "num_embeddings": 10}],
            "split": {"eval_days": 1},
            "evaluation": evaluation,
        }
    )


def test_ndcg_negative_gains_hand_computed():
    # Model order by score: gain 0, then -50, then 5.
    result = ndcg_by_group(np.zeros(3), gains=[5.0, 0.0, -50.0], scores=[0.1, 0.3, 0.2], cutoffs=[1])

    dcg = 0.0 - 50.0 / LOG3 + 5.0 / 2
    ideal = 5.0 + 0.0 - 50.0 / 2
    worst = -50.0 + 0.0 + 5.0 / 2
    assert result["ndcg"] == pytest.approx((dcg - worst) / (ideal - worst), abs=1e-12)
    assert result["ndcg@1"] == pytest.approx((0.0 - -50.0) / (5.0 - -50.0), abs=1e-12)


def test_ndcg_ties_use_mean_gain():
    # The first two rows tie, so both positions get their mean gain 1.
    result = ndcg_by_group(np.zeros(3), gains=[2.0, 0.0, 1.0], scores=[0.5, 0.5, 0.1])

    dcg = 1.0 + 1.0 / LOG3 + 1.0 / 2
    ideal = 2.0 + 1.0 / LOG3 + 0.0
    worst = 0.0 + 1.0 / LOG3 + 2.0 / 2
    assert result["ndcg"] == pytest.approx((dcg - worst) / (ideal - worst), abs=1e-12)
    assert result["ndcg"] == pytest.approx(0.5, abs=1e-12)


def test_ndcg_mean_skips_constant_gain_groups():
    group = np.array([7, 7, 7, 3, 3, 9, 4, 4, 4])
    gains = np.array([5.0, 0.0, -50.0, 0.0, 0.0, 5.0, 2.0, 0.0, 1.0])
    scores = np.array([0.1, 0.3, 0.2, 0.9, 0.1, 0.5, 0.5, 0.5, 0.1])

    result = ndcg_by_group(group, gains, scores)

    first = (0.0 - 50.0 / LOG3 + 2.5 - (-47.5)) / (-20.0 - (-47.5))
    assert result["ndcg"] == pytest.approx((first + 0.5) / 2, abs=1e-12)
    assert result["groups"] == 4
    assert result["groups_scored"] == 2
    assert result["groups_constant_gain"] == 2
    assert result["groups_single_row"] == 1
    assert result["rows_scored"] == 6


def test_ndcg_ideal_and_worst_orders():
    gains = np.array([3.0, -1.0, 0.0, 10.0])

    best = ndcg_by_group(np.zeros(4), gains, scores=gains)
    worst = ndcg_by_group(np.zeros(4), gains, scores=-gains)

    assert best["ndcg"] == pytest.approx(1.0)
    assert worst["ndcg"] == pytest.approx(0.0)


def test_constant_scores_equal_random_order():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 20, 400)
    gains = rng.choice([0.0, 1.0, 5.0, -50.0], 400)

    constant = ndcg_by_group(group, gains, np.ones(400), cutoffs=[3])

    assert constant["ndcg"] == pytest.approx(constant["random_order_ndcg"], abs=1e-12)
    assert constant["ndcg@3"] == pytest.approx(constant["random_order_ndcg@3"], abs=1e-12)


def test_random_order_matches_shuffled_mean():
    rng = np.random.default_rng(1)
    gains = np.array([5.0, 0.0, -50.0, 1.0])
    expected = ndcg_by_group(np.zeros(4), gains, np.zeros(4))["ndcg"]

    shuffled = [ndcg_by_group(np.zeros(4), gains, rng.permutation(4).astype(float))["ndcg"] for _ in range(4000)]

    assert np.mean(shuffled) == pytest.approx(expected, abs=0.01)


def test_ndcg_all_groups_constant_is_nan():
    result = ndcg_by_group(np.array([0, 0, 1]), np.zeros(3), np.array([0.1, 0.2, 0.3]))

    assert math.isnan(result["ndcg"])
    assert result["groups_scored"] == 0


def test_ndcg_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN or infinite"):
        ndcg_by_group(np.zeros(2), np.array([1.0, 0.0]), np.array([np.nan, 0.5]))


def test_realised_value_applies_weights_and_mask():
    labels = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])

    value = realised_value(labels, mask, np.array([5.0, -50.0]))

    assert value.tolist() == [5.0, -50.0, 5.0]


def _write_eval(path, timestamps: list[datetime], users: list[int], ids: list[int]) -> None:
    path.mkdir(parents=True)
    table = pa.table(
        {
            "impression_id": pa.array(ids, pa.int64()),
            "user_id": pa.array(users, pa.int64()),
            "timestamp": pa.array(timestamps, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, path / "part-0.parquet")


def test_user_day_groups_follow_offset(tmp_path):
    times = [
        datetime(2022, 4, 18, 20, tzinfo=timezone.utc),  # 04:00 on 04-19 at UTC+8
        datetime(2022, 4, 19, 1, tzinfo=timezone.utc),  # 09:00 on 04-19 at UTC+8
        datetime(2022, 4, 19, 1, tzinfo=timezone.utc),  # another user
    ]
    _write_eval(tmp_path / "eval", times, users=[1, 1, 2], ids=[10, 11, 12])

    utc = group_keys(tmp_path / "eval", _config(), np.array([10, 11, 12]))
    china = group_keys(tmp_path / "eval", _config(day_utc_offset_hours=8.0), np.array([10, 11, 12]))

    assert len(set(utc.tolist())) == 3
    assert china[0] == china[1]
    assert china[1] != china[2]


def test_group_keys_follow_requested_row_order(tmp_path):
    times = [datetime(2022, 4, 19, hour, tzinfo=timezone.utc) for hour in (1, 2, 3)]
    _write_eval(tmp_path / "eval", times, users=[1, 2, 1], ids=[10, 11, 12])

    keys = group_keys(tmp_path / "eval", _config(), np.array([12, 11, 10]))

    assert keys[0] == keys[2]
    assert keys[0] != keys[1]


def test_group_keys_missing_column_named(tmp_path):
    (tmp_path / "eval").mkdir()
    pq.write_table(pa.table({"impression_id": pa.array([1], pa.int64())}), tmp_path / "eval" / "part-0.parquet")

    with pytest.raises(RankingDataError, match="missing column 'user_id'"):
        group_keys(tmp_path / "eval", _config(), np.array([1]))


def test_request_group_needs_request_column():
    with pytest.raises(ValueError, match="needs columns.impressions.request_id"):
        _config(ndcg_group="request")


def test_value_ndcg_on_split(tmp_path):
    times = [datetime(2022, 4, 19, hour, tzinfo=timezone.utc) for hour in (1, 2, 3)]
    _write_eval(tmp_path / "eval", times, users=[1, 1, 1], ids=[10, 11, 12])
    labels = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])

    result = value_ndcg(_config(), tmp_path / "eval", np.array([10, 11, 12]), labels, np.ones_like(labels), np.array([0.1, 0.3, 0.2]))

    expected = (0.0 - 50.0 / LOG3 + 2.5 - (-47.5)) / (-20.0 - (-47.5))
    assert result["ndcg"] == pytest.approx(expected, abs=1e-12)
    assert result["group_by"] == "user_day"
