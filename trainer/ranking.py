"""Value-score ranking metric: NDCG of the realised value within each group of rows.

The realised value of a row applies the configured value weights to its observed labels,
``sum_a value_weight[a] * label_a``, the same formula that the value score applies to the
predicted probabilities. Rows are ranked by the predicted value score within a group: one
request when the log has request ids, else one user on one calendar day.

Negative gains. A value weight can be negative (``hate = -50``), so a gain can be below zero
and the usual NDCG, DCG divided by the ideal DCG, can leave [0, 1] or divide by zero. This
module uses min-max normalisation instead::

    NDCG = (DCG(model order) - DCG(worst order)) / (DCG(ideal order) - DCG(worst order))

where the ideal order sorts gains from high to low and the worst order from low to high,
with discount 1 / log2(position + 1) for positions 1, 2, .... It is 1 for the ideal order
and 0 for the worst, whatever the signs of the gains. With non-negative gains it is lower
than the usual NDCG, because the usual one gives the worst order a positive score.

Groups where every row has the same gain, all-zero groups and one-row groups included, have
ideal DCG equal to worst DCG: every order is equally good, so NDCG is undefined there. They
are left out of the mean and counted in ``groups_constant_gain``.

Tied scores get the mean gain of their tie block at each position of the block, which is
the expected DCG over random tie-breaking (scikit-learn's ``ndcg_score`` does the same). A
model that gives every row the same score therefore gets the NDCG of a random order, which
is reported as ``ndcg_random_order``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)

_MICROSECONDS_PER_UNIT = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}


class RankingDataError(ValueError):
    """The evaluation data lacks the columns that form the NDCG groups."""


def realised_value(labels: np.ndarray, label_mask: np.ndarray, value_weights: np.ndarray) -> np.ndarray:
    """Return the realised value [N] of labels [N, A] under value weights [A].

    A label with mask 0 (not observed for that row) contributes 0.
    """
    return (labels * label_mask) @ value_weights


def _dcg(group: np.ndarray, gains: np.ndarray, num_groups: int, cutoff: int | None) -> np.ndarray:
    """Return DCG per group of rows already sorted by group, in ranked order within each group."""
    starts = np.searchsorted(group, np.arange(num_groups))
    position = np.arange(len(group)) - starts[group]
    discount = 1.0 / np.log2(position + 2.0)
    if cutoff is not None:
        discount = np.where(position < cutoff, discount, 0.0)
    return np.bincount(group, weights=gains * discount, minlength=num_groups)


def _tie_averaged(group: np.ndarray, scores: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Replace each gain by the mean gain of its block of equal (group, score), rows already sorted."""
    new_block = np.ones(len(group), dtype=bool)
    new_block[1:] = (group[1:] != group[:-1]) | (scores[1:] != scores[:-1])
    block = np.cumsum(new_block) - 1
    totals = np.bincount(block, weights=gains)
    counts = np.bincount(block)
    return (totals / counts)[block]


def ndcg_by_group(
    group: np.ndarray, gains: np.ndarray, scores: np.ndarray, cutoffs: list[int] | tuple[int, ...] = ()
) -> dict:
    """Compute the mean min-max NDCG over groups (see the module docstring for the definition).

    ``group`` contains integer group codes [N], ``gains`` the realised values [N] and ``scores``
    the predicted value scores [N]. Returns ``ndcg`` over whole groups, ``ndcg@k`` for each
    cutoff, the same for a random order, and the group and row counts. The means are
    unweighted over the groups with a defined NDCG, and are NaN when there is none.
    """
    group = np.asarray(group)
    gains = np.asarray(gains, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if not (len(group) == len(gains) == len(scores)):
        raise ValueError(f"group, gains and scores need one entry per row, got {len(group)}, {len(gains)} and {len(scores)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores contain {int((~np.isfinite(scores)).sum())} NaN or infinite values; NDCG needs finite scores")
    if not np.isfinite(gains).all():
        raise ValueError(f"gains contain {int((~np.isfinite(gains)).sum())} NaN or infinite values")
    _, codes = np.unique(group, return_inverse=True)
    codes = codes.ravel()
    num_groups = int(codes.max()) + 1 if len(codes) else 0

    # Groups whose rows all have one gain: every order ties, NDCG is undefined.
    group_min = np.full(num_groups, np.inf)
    group_max = np.full(num_groups, -np.inf)
    np.minimum.at(group_min, codes, gains)
    np.maximum.at(group_max, codes, gains)
    defined = group_max > group_min
    sizes = np.bincount(codes, minlength=num_groups)

    model_order = np.lexsort((-scores, codes))
    ideal_order = np.lexsort((-gains, codes))
    worst_order = np.lexsort((gains, codes))
    model_gains = _tie_averaged(codes[model_order], scores[model_order], gains[model_order])
    # A constant score puts every row of a group in one tie block: the random-order expectation.
    random_gains = _tie_averaged(codes[model_order], np.zeros(len(codes)), gains[model_order])

    result = {}
    for cutoff in (None, *cutoffs):
        name = "ndcg" if cutoff is None else f"ndcg@{cutoff}"
        ideal = _dcg(codes[ideal_order], gains[ideal_order], num_groups, cutoff)
        worst = _dcg(codes[worst_order], gains[worst_order], num_groups, cutoff)
        span = np.where(defined, ideal - worst, 1.0)
        for prefix, ranked_gains in (("", model_gains), ("random_order_", random_gains)):
            dcg = _dcg(codes[model_order], ranked_gains, num_groups, cutoff)
            per_group = (dcg - worst) / span
            result[prefix + name] = float(per_group[defined].mean()) if defined.any() else float("nan")

    result.update(
        groups=num_groups,
        groups_scored=int(defined.sum()),
        groups_constant_gain=int((~defined).sum()),
        groups_single_row=int((sizes == 1).sum()),
        rows=int(len(codes)),
        rows_scored=int(sizes[defined].sum()),
    )
    return result


def resolved_group(cfg: PipelineConfig) -> str:
    """Return ``request`` or ``user_day``, resolving ``evaluation.ndcg_group = 'auto'``."""
    if cfg.evaluation.ndcg_group != "auto":
        return cfg.evaluation.ndcg_group
    return "request" if cfg.columns.impressions.request_id is not None else "user_day"


def group_keys(split_dir: str | Path, cfg: PipelineConfig, impression_ids: np.ndarray) -> np.ndarray:
    """Read the NDCG group of each impression from the split's Parquet, in ``impression_ids`` order.

    ``request`` groups come from the ``request_id`` column. ``user_day`` groups come from
    ``user_id`` and ``timestamp``, with days in UTC shifted by
    ``evaluation.day_utc_offset_hours``. Returns int64 group codes [N].
    """
    split_dir = Path(split_dir)
    kind = resolved_group(cfg)
    columns = ["impression_id", "request_id"] if kind == "request" else ["impression_id", "user_id", "timestamp"]
    dataset = ds.dataset(str(split_dir), format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise RankingDataError(
            f"{split_dir}: missing column {missing[0]!r} for the {kind} NDCG groups; columns present: "
            f"{', '.join(dataset.schema.names)}. Set evaluation.ndcg_group to a grouping the data has"
        )
    table = dataset.to_table(columns=columns)

    stored_ids = table["impression_id"].to_numpy().astype(np.int64)
    order = np.argsort(stored_ids, kind="stable")
    position = np.searchsorted(stored_ids, impression_ids, sorter=order)
    position = np.minimum(position, len(order) - 1)
    rows = order[position]
    if not (stored_ids[rows] == impression_ids).all():
        raise RankingDataError(f"{split_dir}: some evaluated impression ids are not in the split's Parquet files")

    if kind == "request":
        request = table["request_id"]
        if request.null_count:
            raise RankingDataError(f"{split_dir}: column 'request_id' has {request.null_count} NULL values; NDCG groups need a request id on every row")
        return request.to_numpy().astype(np.int64)[rows]

    user = table["user_id"].to_numpy().astype(np.int64)[rows]
    day = _local_day(table["timestamp"], cfg.evaluation.day_utc_offset_hours, split_dir)[rows]
    _, codes = np.unique(np.stack([user, day], axis=1), axis=0, return_inverse=True)
    return codes.ravel().astype(np.int64)


def _local_day(timestamp: pa.ChunkedArray, offset_hours: float, split_dir: Path) -> np.ndarray:
    """Return the calendar day number (days since 1970-01-01) of each timestamp at a UTC offset."""
    if not pa.types.is_timestamp(timestamp.type):
        raise RankingDataError(f"{split_dir}: column 'timestamp' has type {timestamp.type}; expected a timestamp")
    if timestamp.null_count:
        raise RankingDataError(f"{split_dir}: column 'timestamp' has {timestamp.null_count} NULL values")
    ticks = pc.cast(timestamp, pa.int64()).to_numpy().astype(np.float64)
    microseconds = ticks * _MICROSECONDS_PER_UNIT[timestamp.type.unit] + offset_hours * 3_600_000_000
    return np.floor(microseconds / 86_400_000_000).astype(np.int64)


def value_ndcg(
    cfg: PipelineConfig,
    split_dir: str | Path,
    impression_ids: np.ndarray,
    labels: np.ndarray,
    label_mask: np.ndarray,
    value_score: np.ndarray,
) -> dict:
    """Compute the value-score NDCG of one evaluation split; see ``ndcg_by_group`` for the keys."""
    weights = np.array([a.value_weight for a in cfg.actions], dtype=np.float64)
    gains = realised_value(labels.astype(np.float64), label_mask.astype(np.float64), weights)
    groups = group_keys(split_dir, cfg, impression_ids)
    result = ndcg_by_group(groups, gains, value_score, cfg.evaluation.ndcg_cutoffs)
    result["group_by"] = resolved_group(cfg)
    return result
