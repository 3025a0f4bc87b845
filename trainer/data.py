"""Read the Parquet written by the Spark jobs into KeyedJaggedTensor batches.

This is the simple reader: every rank reads the whole split into memory with pyarrow
and takes its own slice. It suits the demo and test sizes, not production logs.

DistributedModelParallel runs collectives in its forward pass, so two guarantees matter.
Every rank yields the same number of batches per epoch, because training drops at most
``world_size - 1`` rows per epoch. Evaluation pads the shorter ranks with masked rows, so
every row is predicted exactly once across ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from valuerank.config import DenseFeature, PipelineConfig, SparseFeature
from valuerank.hashing import bucketize_ids

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The training data does not match the config; the message names the path and column."""


@dataclass
class Batch(Pipelineable):
    """One batch of examples.

    Shapes:
        dense: [B, num_dense]
        sparse: one key per sparse feature, B lengths per key
        labels, label_mask, weights: [B, num_actions]
        row_index: [B], the row's position in its split, -1 for padding rows
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    weights: torch.Tensor
    row_index: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            label_mask=self.label_mask.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            row_index=self.row_index.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in (self.dense, self.labels, self.label_mask, self.weights, self.row_index):
            tensor.record_stream(stream)
        self.sparse.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            label_mask=self.label_mask.pin_memory(),
            weights=self.weights.pin_memory(),
            row_index=self.row_index.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]


@dataclass
class JaggedIds:
    """Bucketized ids of one sparse feature for all rows: CSR offsets [N + 1] and values."""

    offsets: np.ndarray
    values: np.ndarray

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (lengths, values) of the given rows, in that order, without a Python loop."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return lengths, np.zeros(0, dtype=np.int64)
        # Position of every output value in self.values: its row's start plus its rank
        # inside the row, built from a cumulative sum instead of per-row slicing.
        row_of_value = np.repeat(np.arange(len(rows)), lengths)
        first_out = np.cumsum(lengths) - lengths
        inner = np.arange(total) - first_out[row_of_value]
        return lengths, self.values[starts[row_of_value] + inner]


@dataclass
class DenseStats:
    """Per-column mean and standard deviation used by ``standard`` normalisation."""

    mean: dict[str, float]
    std: dict[str, float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


class SplitData:
    """One split (train or eval) held in memory as NumPy arrays, ready to batch."""

    def __init__(self, path: str | Path, cfg: PipelineConfig, dense_stats: DenseStats | None = None):
        self.path = Path(path)
        self.cfg = cfg
        table = _read_table(self.path)
        self.num_rows = table.num_rows
        _check_columns(table, cfg, self.path)

        self.impression_id = table["impression_id"].to_numpy().astype(np.int64)
        self.sparse = {f.name: _jagged_ids(table[f.column], f, self.path) for f in cfg.sparse_features}
        self.raw_dense = np.stack(
            [_float_column(table, f.column, self.path) for f in cfg.dense_features], axis=1
        ) if cfg.dense_features else np.zeros((self.num_rows, 0), dtype=np.float32)
        self.dense_stats = dense_stats or compute_dense_stats(self.raw_dense, cfg.dense_features)
        self.dense = normalize_dense(self.raw_dense, cfg.dense_features, self.dense_stats)

        labels = []
        masks = []
        for column in cfg.label_columns:
            values = table[column].to_numpy(zero_copy_only=False)
            values = np.asarray(values, dtype=np.float64)
            mask = ~np.isnan(values)
            labels.append(np.where(mask, values, 0.0).astype(np.float32))
            masks.append(mask.astype(np.float32))
        self.labels = np.stack(labels, axis=1)
        self.label_mask = np.stack(masks, axis=1)

        weight = table["weight"].to_numpy() if "weight" in table.column_names else np.ones(self.num_rows)
        self.weight = np.asarray(weight, dtype=np.float32)
        self.keep_rate = (
            np.asarray(table["keep_rate"].to_numpy(), dtype=np.float64)
            if "keep_rate" in table.column_names
            else np.ones(self.num_rows)
        )
        stratum_column = cfg.downsampling.stratum_column
        self.stratum_value = (
            np.asarray(table[stratum_column].cast(pa.string()).fill_null("__null__").to_numpy(zero_copy_only=False))
            if stratum_column and stratum_column in table.column_names
            else None
        )

    def make_batch(self, rows: np.ndarray, valid: np.ndarray | None = None) -> Batch:
        """Build a Batch of the given row indices; rows where ``valid`` is False are padding."""
        lengths = []
        values = []
        for feature in self.cfg.sparse_features:
            feature_lengths, feature_values = self.sparse[feature.name].take(rows)
            lengths.append(feature_lengths)
            values.append(feature_values)
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in self.cfg.sparse_features],
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        )

        weights = self.weight[rows][:, None].repeat(len(self.cfg.actions), axis=1)
        label_mask = self.label_mask[rows]
        row_index = rows.astype(np.int64)
        if valid is not None:
            label_mask = label_mask * valid[:, None]
            row_index = np.where(valid, row_index, -1)

        return Batch(
            dense=torch.from_numpy(self.dense[rows]),
            sparse=sparse,
            labels=torch.from_numpy(self.labels[rows]),
            label_mask=torch.from_numpy(label_mask.astype(np.float32)),
            weights=torch.from_numpy(weights.astype(np.float32)),
            row_index=torch.from_numpy(row_index),
        )

    def train_batches(
        self, epoch: int, rank: int, world_size: int, batch_size: int, seed: int, start_batch: int = 0
    ) -> Iterator[Batch]:
        """Yield this rank's shuffled batches for ``epoch``; every rank gets the same count.

        ``start_batch`` skips the first batches of the epoch, so that a resumed run gets the
        same later batches as an uninterrupted epoch.
        """
        order = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
        per_rank = self.num_rows // world_size
        mine = order[rank::world_size][:per_rank]
        for start in range(start_batch * batch_size, per_rank, batch_size):
            yield self.make_batch(mine[start : start + batch_size])

    def num_train_batches(self, world_size: int, batch_size: int) -> int:
        per_rank = self.num_rows // world_size
        return -(-per_rank // batch_size)

    def eval_batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[Batch]:
        """Yield this rank's rows ``rank::world_size``, padded so that all ranks run the same steps."""
        mine = np.arange(rank, self.num_rows, world_size)
        padded = -(-self.num_rows // world_size)
        valid = np.zeros(padded, dtype=bool)
        valid[: len(mine)] = True
        rows = np.zeros(padded, dtype=np.int64)
        rows[: len(mine)] = mine
        for start in range(0, padded, batch_size):
            yield self.make_batch(rows[start : start + batch_size], valid[start : start + batch_size])


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise DataError(f"data not found: {path}; run the downsample job first (valuerank downsample)")
    # Spark writes _SUCCESS and this project writes _manifest.json beside the part files;
    # pyarrow's dataset discovery skips names that start with "_" or ".".
    dataset = ds.dataset(str(path), format="parquet")
    table = dataset.to_table()
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows; check the split dates and the label join manifest")
    return table


def required_columns(cfg: PipelineConfig) -> list[str]:
    """Columns of the downsampled data that the trainer reads."""
    return [
        "impression_id",
        *cfg.label_columns,
        *(f.column for f in cfg.sparse_features),
        *(f.column for f in cfg.dense_features),
    ]


def _check_columns(table: pa.Table, cfg: PipelineConfig, path: Path) -> None:
    missing = [c for c in required_columns(cfg) if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column {missing[0]!r} named in the config; columns present: "
            f"{', '.join(table.column_names)}"
        )


def _jagged_ids(column: pa.ChunkedArray, feature: SparseFeature, path: Path) -> JaggedIds:
    """Turn an id column or an id-list column into bucketized CSR ids; NULL means no ids."""
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        # NULL lists keep an offset pair with equal ends once filled with empty lists.
        array = pc.if_else(pc.is_null(array), pa.scalar([], type=array.type), array)
        offsets = array.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        raw = array.flatten()
    elif pa.types.is_integer(array.type):
        present = pc.is_valid(array).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(present)]).astype(np.int64)
        raw = array.filter(pc.is_valid(array))
    else:
        raise DataError(
            f"{path}: sparse feature {feature.name!r} reads column {feature.column!r} of type "
            f"{array.type}; expected integer ids or a list of integer ids"
        )
    if raw.null_count:
        # Drop NULL ids inside lists and shorten their rows, rather than looking up a real id.
        valid = pc.is_valid(raw).to_numpy(zero_copy_only=False)
        row_of_value = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        kept_per_row = np.bincount(row_of_value[valid], minlength=len(offsets) - 1)
        logger.warning("%s: dropped %d NULL ids inside lists of %r", path, int((~valid).sum()), feature.column)
        offsets = np.concatenate([[0], np.cumsum(kept_per_row)]).astype(np.int64)
        raw = raw.filter(pa.array(valid))
    if not pa.types.is_integer(raw.type):
        raise DataError(
            f"{path}: column {feature.column!r} contains lists of {raw.type}; expected integer ids"
        )
    ids = raw.to_numpy(zero_copy_only=False).astype(np.int64)
    try:
        values = bucketize_ids(ids, feature, source=f"{path}:{feature.column}")
    except ValueError as error:
        raise DataError(str(error)) from error
    return JaggedIds(offsets=offsets, values=values)


def _float_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    array = table[column]
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        raise DataError(f"{path}: dense feature column {column!r} has type {array.type}; expected a number")
    values = np.asarray(array.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    # NOTE: NULL dense values become 0 after normalisation inputs; a missing-value indicator
    # feature would be the next step for columns where NULL carries meaning.
    return np.nan_to_num(values, nan=0.0).astype(np.float32)


def compute_dense_stats(raw: np.ndarray, features: list[DenseFeature]) -> DenseStats:
    """Compute mean and std per dense column (used only by ``standard`` normalisation)."""
    mean = {}
    std = {}
    for i, feature in enumerate(features):
        column = raw[:, i].astype(np.float64)
        mean[feature.column] = float(column.mean()) if len(column) else 0.0
        std[feature.column] = float(column.std()) if len(column) else 1.0
    return DenseStats(mean=mean, std=std)


def normalize_dense(raw: np.ndarray, features: list[DenseFeature], stats: DenseStats) -> np.ndarray:
    """Apply each dense feature's normalisation; returns float32 [N, num_dense]."""
    out = raw.astype(np.float32).copy()
    for i, feature in enumerate(features):
        if feature.normalization == "log1p":
            out[:, i] = np.sign(out[:, i]) * np.log1p(np.abs(out[:, i]))
        elif feature.normalization == "standard":
            std = stats.std.get(feature.column, 1.0) or 1.0
            out[:, i] = (out[:, i] - stats.mean.get(feature.column, 0.0)) / std
    return out
