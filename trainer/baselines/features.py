"""Feature matrices for the baselines, built from the trainer's own batches.

The ids are the hashed embedding rows that the multi-task model looks up, and the dense
values are normalised as for the model, so every model gets the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from trainer.data import SplitData
from valuerank.config import PipelineConfig


@dataclass
class SplitArrays:
    """One split as NumPy arrays in row order.

    Shapes: dense [N, num_dense]; sparse: feature name -> (offsets [N + 1], ids), the
    hashed embedding rows of each row in CSR form; labels, label_mask [N, num_actions];
    weights [N], the row's 1 / keep_rate.
    """

    dense: np.ndarray
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray
    label_mask: np.ndarray
    weights: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.labels)


def collect_split(data: SplitData, cfg: PipelineConfig, batch_size: int = 8192) -> SplitArrays:
    """Read every row of ``data`` once, through ``eval_batches`` of a one-rank job."""
    rows, dense, labels, masks, weights = [], [], [], [], []
    lengths: dict[str, list[np.ndarray]] = {f.name: [] for f in cfg.sparse_features}
    values: dict[str, list[np.ndarray]] = {f.name: [] for f in cfg.sparse_features}
    for batch in data.eval_batches(rank=0, world_size=1, batch_size=batch_size):
        rows.append(batch.row_index.numpy())
        dense.append(batch.dense.numpy())
        labels.append(batch.labels.numpy())
        masks.append(batch.label_mask.numpy())
        weights.append(batch.weights[:, 0].numpy())
        for name, jagged in batch.sparse.to_dict().items():
            lengths[name].append(jagged.lengths().numpy())
            values[name].append(jagged.values().numpy())

    row_index = np.concatenate(rows)
    if not np.array_equal(row_index, np.arange(data.num_rows)):
        raise RuntimeError(
            f"{data.path}: one-rank evaluation batches returned {len(row_index)} rows out of order or incomplete, "
            f"expected rows 0..{data.num_rows - 1} once each"
        )
    sparse = {}
    for name in lengths:
        row_lengths = np.concatenate(lengths[name]).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
        sparse[name] = (offsets, np.concatenate(values[name]).astype(np.int64))
    return SplitArrays(
        dense=np.concatenate(dense).astype(np.float32),
        sparse=sparse,
        labels=np.concatenate(labels).astype(np.float32),
        label_mask=np.concatenate(masks).astype(np.float32),
        weights=np.concatenate(weights).astype(np.float64),
    )


def wide_matrix(arrays: SplitArrays, cfg: PipelineConfig) -> sp.csr_matrix:
    """Return the wide design matrix [N, sum(num_embeddings) + num_dense].

    Each sparse feature gets one column per hash bucket. A row's entry is the number of
    its ids in that bucket for ``sum`` pooling, or that count over the row's id count for
    ``mean`` pooling, so the linear model pools ids the way the embedding bag does.
    """
    blocks = []
    for feature in cfg.sparse_features:
        offsets, ids = arrays.sparse[feature.name]
        lengths = np.diff(offsets)
        entries = np.ones(len(ids))
        if feature.pooling == "mean":
            entries = entries / np.repeat(np.maximum(lengths, 1), lengths)
        block = sp.csr_matrix((entries, ids, offsets), shape=(arrays.num_rows, feature.num_embeddings))
        block.sum_duplicates()
        blocks.append(block)
    blocks.append(sp.csr_matrix(arrays.dense.astype(np.float64)))
    return sp.hstack(blocks, format="csr")


class TargetEncoder:
    """Count and smoothed positive-rate encodings of hashed ids, per sparse feature and action.

    For an id with n training rows of which k have the action, the rate encoding is
    (k + smoothing * prior) / (n + smoothing), where prior is the action's training rate.
    Training rows are encoded out of fold: a row's counts and rates come from the other folds
    only, so no tree is trained on a rate computed from the row's own label, and ids seen once
    get count 0 as new ids in the evaluation split do. Rows of other splits use the whole
    training split. A row with several ids gets the mean of their encodings, and a row
    without ids gets NaN, which xgboost treats as missing.
    """

    def __init__(self, cfg: PipelineConfig, folds: int = 5, smoothing: float = 20.0, seed: int = 0):
        if folds < 2:
            raise ValueError(f"target encoding needs at least 2 folds, got {folds}")
        self.cfg = cfg
        self.folds = folds
        self.smoothing = smoothing
        self.seed = seed
        # feature -> (sorted ids, training rows per id, eligible rows [ids, A], positives [ids, A])
        self.stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.prior = np.zeros(len(cfg.actions))

    def feature_names(self) -> list[str]:
        names = [f"dense_{f.column}" for f in self.cfg.dense_features]
        for feature in self.cfg.sparse_features:
            names.append(f"{feature.name}_count")
            names += [f"{feature.name}_rate_{a.name}" for a in self.cfg.actions]
        return names

    def fit_transform(self, train: SplitArrays) -> np.ndarray:
        """Fit on the training split and return its out-of-fold encoded matrix."""
        masked = train.labels * train.label_mask
        self.prior = masked.sum(axis=0) / np.maximum(train.label_mask.sum(axis=0), 1)
        fold = np.random.default_rng(self.seed).integers(0, self.folds, train.num_rows)
        columns = [train.dense.astype(np.float64)]
        for feature in self.cfg.sparse_features:
            offsets, ids = train.sparse[feature.name]
            row_of_id = np.repeat(np.arange(train.num_rows), np.diff(offsets))
            vocabulary, id_code = np.unique(ids, return_inverse=True)
            size = len(vocabulary)

            # counts[c, a]: rows of id c eligible for action a; positives[c, a]: of them positive.
            counts = _sum_by(id_code, train.label_mask[row_of_id], size)
            positives = _sum_by(id_code, masked[row_of_id], size)
            id_counts = np.bincount(id_code, minlength=size).astype(np.float64)
            self.stats[feature.name] = (vocabulary, id_counts, counts, positives)

            # The same sums per (fold, id), subtracted to leave out each row's own fold.
            fold_code = fold[row_of_id] * size + id_code
            fold_counts = _sum_by(fold_code, train.label_mask[row_of_id], self.folds * size)
            fold_positives = _sum_by(fold_code, masked[row_of_id], self.folds * size)
            out_counts = counts[id_code] - fold_counts[fold_code]
            out_positives = positives[id_code] - fold_positives[fold_code]
            # The count is out of fold too, scaled to the whole split: an id seen only in its own
            # fold gets 0, as an id first seen in the evaluation split does.
            fold_rows = np.bincount(fold_code, minlength=self.folds * size).astype(np.float64)
            out_rows = (id_counts[id_code] - fold_rows[fold_code]) * self.folds / (self.folds - 1)
            columns += self._row_columns(row_of_id, out_rows, out_counts, out_positives, train.num_rows)
        return np.column_stack(columns)

    def transform(self, arrays: SplitArrays) -> np.ndarray:
        """Encode another split with the statistics of the whole training split."""
        columns = [arrays.dense.astype(np.float64)]
        for feature in self.cfg.sparse_features:
            vocabulary, train_rows, counts, positives = self.stats[feature.name]
            offsets, ids = arrays.sparse[feature.name]
            row_of_id = np.repeat(np.arange(arrays.num_rows), np.diff(offsets))
            if len(vocabulary) == 0:
                raise ValueError(f"sparse feature {feature.name!r} has no id in the training split; it cannot be encoded")
            position = np.minimum(np.searchsorted(vocabulary, ids), len(vocabulary) - 1)
            known = vocabulary[position] == ids
            id_counts = np.where(known, train_rows[position], 0.0)
            id_rows = np.where(known[:, None], counts[position], 0.0)
            id_positives = np.where(known[:, None], positives[position], 0.0)
            columns += self._row_columns(row_of_id, id_counts, id_rows, id_positives, arrays.num_rows)
        return np.column_stack(columns)

    def _row_columns(
        self, row_of_id: np.ndarray, id_counts: np.ndarray, counts: np.ndarray, positives: np.ndarray, num_rows: int
    ) -> list[np.ndarray]:
        """Turn per-id counts and positives into per-row count and rate columns (mean over the row's ids)."""
        rates = (positives + self.smoothing * self.prior) / (counts + self.smoothing)
        ids_per_row = np.bincount(row_of_id, minlength=num_rows).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            row_count = np.bincount(row_of_id, weights=id_counts, minlength=num_rows) / ids_per_row
            row_rates = [
                np.bincount(row_of_id, weights=rates[:, a], minlength=num_rows) / ids_per_row
                for a in range(rates.shape[1])
            ]
        return [row_count, *row_rates]


def _sum_by(codes: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Sum rows of ``values`` [M, A] by integer code into [size, A]."""
    return np.stack([np.bincount(codes, weights=values[:, a], minlength=size) for a in range(values.shape[1])], axis=1)
