"""Decode Arrow record batches into NumPy columns ready for batching, without a loop over rows.

A ``Chunk`` contains the decoded rows of one row range: normalised dense features, labels and
their mask, weights, the row's position in the split, and one bucketized id column per
sparse feature. Sparse ids come from the Arrow list offsets and values (or one id per row),
so the KeyedJaggedTensor lengths and values are array operations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from trainer.data import DataError, DenseStats, normalize_dense
from valuerank.config import PipelineConfig, SparseFeature
from valuerank.hashing import bucketize_ids

logger = logging.getLogger(__name__)


@dataclass
class SparseColumn:
    """Bucketized ids of one sparse feature: ``lengths`` [n] (None when every row has one id) and ``values``."""

    lengths: np.ndarray | None
    values: np.ndarray
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.lengths is not None and self.offsets is None:
            self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def row_lengths(self, rows: slice | np.ndarray, count: int) -> np.ndarray:
        if self.lengths is None:
            return np.ones(count, dtype=np.int32)
        return self.lengths[rows].astype(np.int32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Return the ids of ``rows`` in order."""
        if self.lengths is None:
            return self.values[rows]
        starts = self.offsets[rows]
        lengths = self.lengths[rows]
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        # Position of every output id in self.values: its row's start plus its place inside
        # the row, from a cumulative sum instead of one slice per row.
        row_of_value = np.repeat(np.arange(len(rows)), lengths)
        first_out = np.cumsum(lengths) - lengths
        inner = np.arange(total) - first_out[row_of_value]
        return self.values[starts[row_of_value] + inner]

    def slice_values(self, begin: int, end: int) -> np.ndarray:
        if self.lengths is None:
            return self.values[begin:end]
        return self.values[self.offsets[begin] : self.offsets[end]]


@dataclass
class Chunk:
    """Decoded rows of one row range; every array has one entry (or row) per row."""

    dense: np.ndarray
    labels: np.ndarray
    label_mask: np.ndarray
    weight: np.ndarray
    row_index: np.ndarray
    sparse: list[SparseColumn]

    @property
    def num_rows(self) -> int:
        return len(self.row_index)


def decode(table: pa.Table, cfg: PipelineConfig, dense_stats: DenseStats, first_row: int, source: str) -> Chunk:
    """Decode ``table`` (rows of one row range) into a Chunk; ``first_row`` is its position in the split."""
    n = table.num_rows
    sparse = [_sparse_column(table.column(f.column), f, source) for f in cfg.sparse_features]

    if cfg.dense_features:
        raw = np.empty((n, len(cfg.dense_features)), dtype=np.float32)
        for i, feature in enumerate(cfg.dense_features):
            raw[:, i] = dense_values(table.column(feature.column), feature.column, source)
        dense = normalize_dense(raw, cfg.dense_features, dense_stats)
    else:
        dense = np.zeros((n, 0), dtype=np.float32)

    labels = np.empty((n, len(cfg.actions)), dtype=np.float32)
    label_mask = np.empty((n, len(cfg.actions)), dtype=np.float32)
    for i, column in enumerate(cfg.label_columns):
        labels[:, i], label_mask[:, i] = label_values(table.column(column))

    if "weight" in table.column_names:
        weight = _to_float32(table.column("weight"), fill=1.0)
    else:
        weight = np.ones(n, dtype=np.float32)

    return Chunk(
        dense=dense,
        labels=labels,
        label_mask=label_mask,
        weight=weight,
        row_index=np.arange(first_row, first_row + n, dtype=np.int64),
        sparse=sparse,
    )


def _to_float32(column: pa.ChunkedArray, fill: float) -> np.ndarray:
    if pa.types.is_null(column.type):
        return np.full(len(column), fill, dtype=np.float32)
    array = pc.cast(column, pa.float32())
    if array.null_count:
        array = pc.fill_null(array, fill)
    return array.to_numpy()


def is_number_type(arrow_type: pa.DataType) -> bool:
    """True for the Arrow types that the loader reads as numbers: integer, floating, boolean or null."""
    return (
        pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
        or pa.types.is_boolean(arrow_type) or pa.types.is_null(arrow_type)
    )


def is_id_type(arrow_type: pa.DataType) -> bool:
    """True for the Arrow types that the loader reads as ids: integer or a list of integers (null allowed)."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_integer(arrow_type) or pa.types.is_null(arrow_type)


def dense_values(column: pa.ChunkedArray, name: str, source: str) -> np.ndarray:
    """Return a dense feature column as float32, NULL as 0 (the value before normalisation)."""
    kind = column.type
    if not is_number_type(kind):
        raise DataError(f"{source}: dense feature column {name!r} has type {kind}; expected a number")
    values = _to_float32(column, fill=0.0)
    # NaN stored as a value (not NULL) is treated like NULL, as the reader before this one did.
    return np.nan_to_num(values, nan=0.0)


def label_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Return (label, mask) as float32; a NULL label has mask 0 and takes no part in the loss."""
    if pa.types.is_null(column.type):
        zeros = np.zeros(len(column), dtype=np.float32)
        return zeros, zeros.copy()
    mask = np.ones(len(column), dtype=np.float32)
    if column.null_count:
        mask = pc.is_valid(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return _to_float32(column, fill=0.0), mask


def _sparse_column(column: pa.ChunkedArray, feature: SparseFeature, source: str) -> SparseColumn:
    """Turn an id column or an id-list column into bucketized ids; NULL means no ids."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(array)
    if pa.types.is_null(array.type):
        return SparseColumn(lengths=np.zeros(n, dtype=np.int64), values=np.zeros(0, dtype=np.int64))

    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = pc.list_value_length(array)
        if lengths.null_count:
            lengths = pc.fill_null(lengths, 0)
        lengths = lengths.to_numpy().astype(np.int64)
        # flatten() skips the values behind NULL lists and honours the slice offset.
        raw = array.flatten()
    elif pa.types.is_integer(array.type):
        if array.null_count == 0:
            return SparseColumn(lengths=None, values=_bucketize(array, feature, source))
        valid = pc.is_valid(array)
        lengths = valid.to_numpy(zero_copy_only=False).astype(np.int64)
        raw = array.filter(valid)
    else:
        raise DataError(
            f"{source}: sparse feature {feature.name!r} reads column {feature.column!r} of type "
            f"{array.type}; expected integer ids or a list of integer ids"
        )

    if pa.types.is_null(raw.type):
        return SparseColumn(lengths=np.zeros(n, dtype=np.int64), values=np.zeros(0, dtype=np.int64))
    if not pa.types.is_integer(raw.type):
        raise DataError(f"{source}: column {feature.column!r} contains lists of {raw.type}; expected integer ids")
    if raw.null_count:
        # Drop NULL ids inside lists and shorten their rows, rather than looking up a real id.
        valid = pc.is_valid(raw).to_numpy(zero_copy_only=False)
        row_of_value = np.repeat(np.arange(n), lengths)
        logger.warning("%s: dropped %d NULL ids inside lists of %r", source, int((~valid).sum()), feature.column)
        lengths = np.bincount(row_of_value[valid], minlength=n).astype(np.int64)
        raw = raw.filter(pa.array(valid))
    return SparseColumn(lengths=lengths, values=_bucketize(raw, feature, source))


def _bucketize(array: pa.Array, feature: SparseFeature, source: str) -> np.ndarray:
    ids = array.to_numpy(zero_copy_only=False)
    if ids.dtype != np.int64:
        ids = ids.astype(np.int64)
    try:
        return bucketize_ids(ids, feature, source=f"{source}:{feature.column}")
    except ValueError as error:
        raise DataError(str(error)) from error


def gather(chunks: list[tuple[Chunk, np.ndarray]], num_features: int, num_actions: int) -> dict[str, torch.Tensor]:
    """Build one batch from (chunk, sorted local rows) pieces, as a dict of CPU tensors.

    The dict (not a Batch) is what DataLoader workers send, because plain tensors move
    through shared memory and pin_memory without custom pickling.
    Keys: dense [B, D], labels, label_mask, weights [B, A], row_index [B], and the
    KeyedJaggedTensor parts ``lengths`` [F * B] int32 and ``values`` (feature-major).
    """
    dense, labels, label_mask, weight, row_index = [], [], [], [], []
    lengths: list[list[np.ndarray]] = [[] for _ in range(num_features)]
    values: list[list[np.ndarray]] = [[] for _ in range(num_features)]
    for chunk, rows in chunks:
        count = len(rows)
        contiguous = count > 0 and int(rows[-1]) - int(rows[0]) + 1 == count
        index: slice | np.ndarray = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        dense.append(chunk.dense[index])
        labels.append(chunk.labels[index])
        label_mask.append(chunk.label_mask[index])
        weight.append(chunk.weight[index])
        row_index.append(chunk.row_index[index])
        for f, column in enumerate(chunk.sparse):
            lengths[f].append(column.row_lengths(index, count))
            if contiguous:
                values[f].append(column.slice_values(index.start, index.stop))
            else:
                values[f].append(column.take(rows))

    weights = _concat(weight)
    return {
        "dense": torch.from_numpy(_concat(dense)),
        "labels": torch.from_numpy(_concat(labels)),
        "label_mask": torch.from_numpy(_concat(label_mask)),
        "weights": torch.from_numpy(np.repeat(weights[:, None], num_actions, axis=1)),
        "row_index": torch.from_numpy(_concat(row_index)),
        "lengths": torch.from_numpy(np.concatenate([np.concatenate(parts) for parts in lengths]).astype(np.int32, copy=False)),
        "values": torch.from_numpy(np.concatenate([np.concatenate(parts) for parts in values]).astype(np.int64, copy=False)),
    }


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    # Always a new array: a tensor over a view would keep, and send through shared memory,
    # the whole decoded row range instead of the batch's rows.
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)


def padding(count: int, num_dense: int, num_features: int, num_actions: int) -> dict[str, torch.Tensor]:
    """Return ``count`` padding rows: no ids, zero features, label mask 0 and row index -1."""
    return {
        "dense": torch.zeros(count, num_dense),
        "labels": torch.zeros(count, num_actions),
        "label_mask": torch.zeros(count, num_actions),
        "weights": torch.zeros(count, num_actions),
        "row_index": torch.full((count,), -1, dtype=torch.int64),
        "lengths": torch.zeros(num_features * count, dtype=torch.int32),
        "values": torch.zeros(0, dtype=torch.int64),
    }


def concat_batches(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], num_features: int) -> dict[str, torch.Tensor]:
    """Append the rows of ``second`` to ``first``, keeping the feature-major KeyedJaggedTensor layout."""
    out = {key: torch.cat([first[key], second[key]]) for key in ("dense", "labels", "label_mask", "weights", "row_index")}
    a_lengths = first["lengths"].view(num_features, -1)
    b_lengths = second["lengths"].view(num_features, -1)
    a_values = torch.split(first["values"], a_lengths.sum(dim=1).tolist())
    b_values = torch.split(second["values"], b_lengths.sum(dim=1).tolist())
    out["lengths"] = torch.cat([a_lengths, b_lengths], dim=1).reshape(-1)
    out["values"] = torch.cat([t for pair in zip(a_values, b_values) for t in pair])
    return out
