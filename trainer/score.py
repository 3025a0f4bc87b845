"""Score impressions with an exported model: calibrated probability per action and value score.

    valuerank score --model runs/demo/model.pt --impressions runs/demo/downsampled/eval \\
        --out runs/demo/scores.parquet

The input is Parquet (a file or a folder) with the feature columns that the config names;
labels are not needed. Each probability is corrected for the training keep rates exactly
as in evaluation (``odds(p) = odds(q) * keep_negative / keep_positive``, per stratum value
when ``downsampling.stratum_column`` is set and present), and the value score is
``sum(value_weight * p)`` over the actions. The output has ``impression_id``, ``user_id`` and
``item_id`` when present, ``p_<action>`` per action and ``value_score``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from launch.local import positive_int
from trainer.data import DataError, DenseStats, normalize_dense
from trainer.export import ExportedModel, load_exported
from trainer.metrics import correct_for_keep_rates, keep_rates_for_rows
from valuerank.config import SparseFeature
from valuerank.hashing import bucketize_ids

logger = logging.getLogger(__name__)

_ID_COLUMNS = ("impression_id", "user_id", "item_id")


def _ids(array: pa.Array, feature: SparseFeature, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (lengths, bucketized ids) of one id or id-list column; NULL rows and NULL ids give no ids."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        array = pc.if_else(pc.is_null(array), pa.scalar([], type=array.type), array)
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
        raw = pc.list_flatten(array)
        if raw.null_count:
            row_of_value = np.repeat(np.arange(len(lengths)), lengths)
            valid = pc.is_valid(raw).to_numpy(zero_copy_only=False)
            lengths = np.bincount(row_of_value[valid], minlength=len(lengths)).astype(np.int64)
            raw = raw.filter(pa.array(valid))
    elif pa.types.is_integer(array.type):
        valid = pc.is_valid(array)
        lengths = valid.to_numpy(zero_copy_only=False).astype(np.int64)
        raw = array.filter(valid)
    else:
        raise DataError(f"{source}: column {feature.column!r} has type {array.type}; expected integer ids or lists of them")
    if not pa.types.is_integer(raw.type):
        raise DataError(f"{source}: column {feature.column!r} contains lists of {raw.type}; expected integer ids")
    ids = raw.to_numpy(zero_copy_only=False).astype(np.int64)
    try:
        values = bucketize_ids(ids, feature, source=f"{source}:{feature.column}")
    except ValueError as error:
        raise DataError(str(error)) from error
    return lengths, values


def _features(batch: pa.RecordBatch, exported: ExportedModel, source: str) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    cfg = exported.cfg
    lengths = []
    values = []
    for feature in cfg.sparse_features:
        feature_lengths, feature_values = _ids(batch.column(feature.column), feature, source)
        lengths.append(feature_lengths)
        values.append(feature_values)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in cfg.sparse_features],
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
    )

    raw = np.zeros((batch.num_rows, len(cfg.dense_features)), dtype=np.float32)
    for i, feature in enumerate(cfg.dense_features):
        column = batch.column(feature.column).cast(pa.float64()).to_numpy(zero_copy_only=False)
        raw[:, i] = np.nan_to_num(np.asarray(column, dtype=np.float64), nan=0.0)
    stats = DenseStats(mean=exported.dense_stats["mean"], std=exported.dense_stats["std"])
    dense = torch.from_numpy(normalize_dense(raw, cfg.dense_features, stats))
    return dense, sparse


@torch.no_grad()
def score_batch(batch: pa.RecordBatch, exported: ExportedModel, source: str = "impressions") -> dict[str, np.ndarray]:
    """Return ``p_<action>`` (corrected probabilities) and ``value_score`` for one batch of rows."""
    cfg = exported.cfg
    dense, sparse = _features(batch, exported, source)
    q = torch.sigmoid(exported.model(dense, sparse)).double().numpy()

    stratum_column = cfg.downsampling.stratum_column
    stratum_value = None
    if stratum_column and stratum_column in batch.schema.names:
        stratum_value = np.asarray(
            batch.column(stratum_column).cast(pa.string()).fill_null("__null__").to_numpy(zero_copy_only=False)
        )

    scores = {}
    value_score = np.zeros(batch.num_rows)
    for i, action in enumerate(cfg.actions):
        if cfg.training.loss_weighting == "inverse_keep_rate":
            p = q[:, i]
        else:
            keep_positive, keep_negative = keep_rates_for_rows(exported.action_keep_rates, action.name, stratum_value, batch.num_rows)
            p = correct_for_keep_rates(q[:, i], keep_positive, keep_negative)
        scores[f"p_{action.name}"] = p
        value_score += action.value_weight * p
    scores["value_score"] = value_score
    return scores


def score_impressions(model_path: Path, impressions: Path, out: Path, batch_size: int = 65536) -> int:
    """Score every row of ``impressions`` into the Parquet file ``out``; return the row count."""
    exported = load_exported(model_path)
    if not impressions.exists():
        raise DataError(f"impressions not found: {impressions}; pass a Parquet file or folder")
    resolved_out, resolved_in = out.resolve(), impressions.resolve()
    if resolved_out == resolved_in or (impressions.is_dir() and resolved_out.is_relative_to(resolved_in)):
        raise DataError(f"--out {out} is inside the impressions being scored ({impressions}); write the scores elsewhere")
    dataset = ds.dataset(str(impressions), format="parquet")
    needed = [f.column for f in exported.cfg.sparse_features] + [f.column for f in exported.cfg.dense_features]
    missing = [column for column in needed if column not in dataset.schema.names]
    if missing:
        raise DataError(
            f"{impressions}: missing column {missing[0]!r} that the model's config reads; columns present: "
            f"{', '.join(dataset.schema.names)}"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    rows = 0
    try:
        for batch in dataset.to_batches(batch_size=batch_size):
            if batch.num_rows == 0:
                continue
            columns = {name: batch.column(name) for name in _ID_COLUMNS if name in batch.schema.names}
            columns.update({name: pa.array(values) for name, values in score_batch(batch, exported, str(impressions)).items()})
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if rows == 0:
        raise DataError(f"{impressions}: no rows to score")
    logger.info("scored %d rows from %s into %s", rows, impressions, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run ``valuerank score``."""
    parser = argparse.ArgumentParser(prog="valuerank score", description="Score impressions with an exported model.")
    parser.add_argument("--model", required=True, type=Path, help="file written by valuerank export")
    parser.add_argument("--impressions", required=True, type=Path, help="impressions to score (Parquet file or folder)")
    parser.add_argument("--out", required=True, type=Path, help="Parquet file to write")
    parser.add_argument("--batch-size", type=positive_int, default=65536, help="rows scored per forward pass")
    args = parser.parse_args(argv)
    rows = score_impressions(args.model, args.impressions, args.out, args.batch_size)
    print(f"scored {rows} rows: {args.out}")
    return 0
