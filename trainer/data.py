"""Types shared by the readers of the Parquet written by the Spark jobs, and reader selection.

``open_split`` returns the reader that ``training.reader`` names: the native Arrow loader
(``trainer.loader.SplitData``) or the petastorm reader (``trainer.petastorm_reader``), which
needs the optional petastorm environment. Both yield ``Batch`` objects.

DistributedModelParallel runs collectives in its forward pass, so two guarantees matter.
Every rank yields the same number of batches per epoch, and evaluation pads the shorter
ranks with masked rows, so every row is predicted exactly once across ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from valuerank.config import DenseFeature, PipelineConfig

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
class DenseStats:
    """Per-column mean and standard deviation used by ``standard`` normalisation."""

    mean: dict[str, float]
    std: dict[str, float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def batch_from_parts(parts: dict[str, torch.Tensor], cfg: PipelineConfig) -> Batch:
    """Build a Batch from the tensors that a loader worker sends (see ``trainer.arrow_chunks.gather``)."""
    sparse = KeyedJaggedTensor(
        keys=[f.name for f in cfg.sparse_features],
        values=parts["values"],
        lengths=parts["lengths"],
    )
    return Batch(
        dense=parts["dense"],
        sparse=sparse,
        labels=parts["labels"],
        label_mask=parts["label_mask"],
        weights=parts["weights"],
        row_index=parts["row_index"],
    )


def open_split(path: str | Path, cfg: PipelineConfig, dense_stats: DenseStats | None = None):
    """Open one split (train/ or eval/) with the reader that ``training.reader`` names."""
    if cfg.training.reader == "petastorm":
        from trainer.petastorm_reader import PetastormSplit

        return PetastormSplit(path, cfg, dense_stats)
    from trainer.loader import SplitData

    return SplitData(path, cfg, dense_stats)


def __getattr__(name: str):
    # ``SplitData`` lives in trainer.loader, which imports this module; importing it lazily
    # keeps ``from trainer.data import SplitData`` working without an import cycle.
    if name == "SplitData":
        from trainer.loader import SplitData

        return SplitData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def required_columns(cfg: PipelineConfig) -> list[str]:
    """Columns of the downsampled data that the trainer reads."""
    return [
        "impression_id",
        *cfg.label_columns,
        *(f.column for f in cfg.sparse_features),
        *(f.column for f in cfg.dense_features),
    ]


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
