"""The native loader: Parquet row groups to ready batches with pyarrow, torch DataLoader workers.

Each rank reads only its own rows. ``trainer.batch_plan`` decides from the Parquet footers
which rows of which row group form each batch. DataLoader workers (``training.loader_workers``)
read and decode their row ranges, shuffle them through a buffer and build the batch tensors.
The tensors reach the training process through shared memory, pinned when training on a GPU.
With 0 workers the same plan runs in the training process.

Folder layout: Parquet files are found recursively, so Hive-style partitions such as
``train/dt=2024-05-01/part-0.parquet`` work. Names starting with ``_`` or ``.`` (``_SUCCESS``,
``_manifest.json``, ``.crc`` files) are skipped. Partition values in folder names are not
read as columns.

Example::

    data = SplitData("runs/demo/downsampled/train", cfg)
    for batch in data.train_batches(epoch=0, rank=0, world_size=2, batch_size=512, seed=0):
        logits = model(batch.dense, batch.sparse)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.arrow_chunks import Chunk, concat_batches, decode, dense_values, gather, label_values, padding
from trainer.batch_plan import (
    RowGroup,
    RowRange,
    batch_positions,
    cut,
    epoch_order,
    num_batches,
    rank_ranges,
    rows_per_rank,
    split_streams,
    stream_seed,
)
from trainer.data import Batch, DataError, DenseStats, batch_from_parts, required_columns
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)

# Optional columns that the loader reads when a file has them.
OPTIONAL_COLUMNS = ("weight",)


def list_parquet_files(root: Path) -> list[Path]:
    """Return the Parquet files under ``root`` (or ``root`` itself), sorted, skipping ``_*`` and ``.*`` names."""
    if not root.exists():
        raise DataError(f"data not found: {root}; run the downsample job first (valuerank downsample)")
    if root.is_file():
        return [root]

    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        if any(part.startswith(("_", ".")) for part in relative):
            continue
        if path.is_file():
            files.append(path)
    return files


@dataclass(frozen=True)
class FileInfo:
    """Columns of one Parquet file that the loader reads."""

    path: str
    columns: tuple[str, ...]


def index_row_groups(files: list[Path], cfg: PipelineConfig) -> tuple[list[RowGroup], dict[str, FileInfo]]:
    """Read the footers: every non-empty row group in file order, and the columns to read per file.

    Files without rows are skipped before their columns are checked, because a writer may
    leave an empty part file with any schema.
    """
    required = required_columns(cfg)
    groups: list[RowGroup] = []
    infos: dict[str, FileInfo] = {}
    first_row = 0
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file ({error}); remove it from the data folder") from error
        metadata = parquet.metadata
        if metadata.num_rows == 0:
            continue

        names = parquet.schema_arrow.names
        missing = [column for column in required if column not in names]
        if missing:
            raise DataError(
                f"{path}: missing column {missing[0]!r} named in the config; columns present: {', '.join(names)}"
            )
        columns = tuple(required) + tuple(c for c in OPTIONAL_COLUMNS if c in names)
        infos[str(path)] = FileInfo(str(path), columns)

        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            if rows:
                groups.append(RowGroup(str(path), index, rows, first_row))
                first_row += rows
    return groups, infos


@dataclass(frozen=True)
class StreamPlan:
    """The row ranges of one stream, its shuffle seed (None: no buffer shuffle) and batches to skip."""

    ranges: tuple[RowRange, ...]
    seed: tuple[int, ...] | None
    skip: int
    buffer_rows: int


class RangeReader:
    """Reads and decodes row ranges; keeps one open ParquetFile per path."""

    def __init__(self, groups: list[RowGroup], infos: dict[str, FileInfo], cfg: PipelineConfig, dense_stats: DenseStats):
        self.groups = groups
        self.infos = infos
        self.cfg = cfg
        self.dense_stats = dense_stats
        self._files: dict[str, pq.ParquetFile] = {}

    def read(self, piece: RowRange) -> Chunk:
        group = self.groups[piece.group]
        parquet = self._files.get(group.path)
        if parquet is None:
            parquet = self._files[group.path] = pq.ParquetFile(group.path)
        table = parquet.read_row_group(group.index, columns=list(self.infos[group.path].columns))
        if piece.start or piece.stop != group.num_rows:
            table = table.slice(piece.start, piece.num_rows)
        source = f"{group.path} (row group {group.index})"
        return decode(table, self.cfg, self.dense_stats, group.first_row + piece.start, source)


def iterate_stream(plan: StreamPlan, reader: RangeReader, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the batches of one stream after its first ``plan.skip``, reading only the ranges they need."""
    sizes = [piece.num_rows for piece in plan.ranges]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    pending = np.array(sizes, dtype=np.int64)
    loaded: dict[int, Chunk] = {}
    rng = np.random.default_rng(list(plan.seed)) if plan.seed is not None else None
    num_features = len(reader.cfg.sparse_features)
    num_actions = len(reader.cfg.actions)

    for j, positions in enumerate(batch_positions(sizes, batch_size, plan.buffer_rows, rng)):
        # Positions are sorted, so each range's rows form one run.
        range_ids = np.searchsorted(starts, positions, side="right") - 1
        ids, first, counts = np.unique(range_ids, return_index=True, return_counts=True)
        pieces = []
        for range_id, begin, count in zip(ids.tolist(), first.tolist(), counts.tolist()):
            if j >= plan.skip:
                chunk = loaded.get(range_id)
                if chunk is None:
                    chunk = loaded[range_id] = reader.read(plan.ranges[range_id])
                pieces.append((chunk, positions[begin : begin + count] - starts[range_id]))
            pending[range_id] -= count
        if j >= plan.skip:
            yield gather(pieces, num_features, num_actions)
        # Free every range whose rows have all been batched.
        for range_id in ids.tolist():
            if pending[range_id] == 0:
                loaded.pop(range_id, None)


class _StreamDataset(IterableDataset):
    """Worker i of the DataLoader runs ``plans[i]``."""

    def __init__(self, plans: list[StreamPlan], reader: RangeReader, batch_size: int):
        self.plans = plans
        self.reader = reader
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        return iterate_stream(self.plans[worker], self.reader, self.batch_size)


class SplitData:
    """One split (train/ or eval/) read by row group; the trainer's data interface.

    Attributes that scoring uses (``labels``, ``label_mask``, ``impression_id``,
    ``stratum_value``) are read on first use, one small column set for the whole split.
    """

    def __init__(self, path: str | Path, cfg: PipelineConfig, dense_stats: DenseStats | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.files = list_parquet_files(self.path)
        self.groups, self.infos = index_row_groups(self.files, cfg)
        self.num_rows = sum(group.num_rows for group in self.groups)
        if self.num_rows == 0:
            raise DataError(f"{self.path}: no rows; check the split dates and the label join manifest")
        self.dense_stats = dense_stats or self._compute_dense_stats()
        self.reader = RangeReader(self.groups, self.infos, cfg, self.dense_stats)
        self._scoring: dict[str, np.ndarray | None] | None = None

    # -- the trainer's interface ------------------------------------------------------------

    def num_train_batches(self, world_size: int, batch_size: int) -> int:
        """Batches per rank per epoch, equal on every rank."""
        return num_batches(rows_per_rank(self.num_rows, world_size), batch_size)

    def train_batches(
        self, epoch: int, rank: int, world_size: int, batch_size: int, seed: int, start_batch: int = 0
    ) -> Iterator[Batch]:
        """Yield this rank's batches of ``epoch``, from batch ``start_batch`` on.

        The batches are a pure function of (seed, epoch, rank, world_size, the data and the
        loader settings), so skipping k batches yields exactly batches k, k + 1, ... of an
        uninterrupted epoch.
        """
        train = self.cfg.training
        ranges = rank_ranges(self.groups, epoch, seed, rank, world_size, train.shuffle)
        streams = split_streams(ranges, batch_size, max(train.resolved_loader_workers, 1))
        plans = [
            StreamPlan(
                ranges=tuple(stream),
                seed=tuple(stream_seed(seed, epoch, rank, s)) if train.shuffle else None,
                skip=len(range(s, start_batch, len(streams))),
                buffer_rows=train.shuffle_buffer_rows,
            )
            for s, stream in enumerate(streams)
        ]
        for parts in self._run(plans, batch_size, start_batch):
            yield batch_from_parts(parts, self.cfg)

    def eval_batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[Batch]:
        """Yield rank ``rank``'s share of the rows in file order, padded so that all ranks run the same steps.

        Rank r reads rows [r * P, (r + 1) * P) with P = ceil(rows / world_size). Ranks with
        fewer rows get padding rows (row index -1, label mask 0), so batch j has the same size
        on every rank and every row is predicted exactly once across ranks.
        """
        per_rank = math.ceil(self.num_rows / world_size)
        begin = min(self.num_rows, rank * per_rank)
        end = min(self.num_rows, (rank + 1) * per_rank)
        ranges = cut(epoch_order(self.groups, 0, 0, shuffle=False), begin, end)
        streams = split_streams(ranges, batch_size, max(self.cfg.training.resolved_loader_workers, 1))
        plans = [StreamPlan(tuple(stream), None, 0, 0) for stream in streams]

        shape = (len(self.cfg.dense_features), len(self.cfg.sparse_features), len(self.cfg.actions))
        real = self._run(plans, batch_size, 0) if end > begin else iter(())
        for j in range(num_batches(per_rank, batch_size)):
            size = min(batch_size, per_rank - j * batch_size)
            parts = next(real, None)
            if parts is None:
                parts = padding(size, *shape)
            elif len(parts["row_index"]) < size:
                parts = concat_batches(parts, padding(size - len(parts["row_index"]), *shape), shape[1])
            yield batch_from_parts(parts, self.cfg)

    def make_batch(self, rows: np.ndarray) -> Batch:
        """Build one Batch of the given split positions (sorted ascending), read in the calling process."""
        ranges = epoch_order(self.groups, 0, 0, shuffle=False)
        starts = np.array([group.first_row for group in self.groups] + [self.num_rows])
        pieces = []
        for group_id in np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist():
            local = rows[(rows >= starts[group_id]) & (rows < starts[group_id + 1])] - starts[group_id]
            pieces.append((self.reader.read(ranges[group_id]), local))
        parts = gather(pieces, len(self.cfg.sparse_features), len(self.cfg.actions))
        return batch_from_parts(parts, self.cfg)

    # -- columns for scoring ----------------------------------------------------------------

    @property
    def labels(self) -> np.ndarray:
        """Labels [num_rows, num_actions] in split order, NULL as 0."""
        return self._scoring_columns()["labels"]

    @property
    def label_mask(self) -> np.ndarray:
        """1 where the label is present, 0 where it is NULL; [num_rows, num_actions]."""
        return self._scoring_columns()["label_mask"]

    @property
    def impression_id(self) -> np.ndarray:
        return self._scoring_columns()["impression_id"]

    @property
    def stratum_value(self) -> np.ndarray | None:
        """Values of ``downsampling.stratum_column`` as strings (NULL as ``__null__``), or None without it."""
        return self._scoring_columns()["stratum_value"]

    # -- internals --------------------------------------------------------------------------

    def _run(self, plans: list[StreamPlan], batch_size: int, start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Interleave the streams' batches: overall batch j comes from stream j % len(plans).

        DataLoader worker i runs stream (start_batch + i) % S, because DataLoader returns its
        workers' batches round robin starting at worker 0.
        """
        count = len(plans)
        rotated = [plans[(start_batch + i) % count] for i in range(count)]
        train = self.cfg.training
        if train.resolved_loader_workers == 0:
            # NOTE: this path neither pins memory nor prefetches, so on a GPU the copy of each
            # batch waits for its decoding; use loader_workers >= 1 there.
            # TODO: read the next row group on a background thread while this one is decoded.
            # Reading and decoding one after the other keeps this path below read_table's rate.
            streams = [iterate_stream(plan, self.reader, batch_size) for plan in rotated]
            for index in itertools.count():
                parts = next(streams[index % count], None)
                if parts is None:
                    # Stream sizes fall by at most one batch in round-robin order, so the
                    # first stream that runs out marks the end of all of them.
                    return
                yield parts

        loader = DataLoader(
            _StreamDataset(rotated, self.reader, batch_size),
            batch_size=None,
            num_workers=count,
            pin_memory=train.device == "cuda",
            prefetch_factor=train.prefetch_batches,
        )
        yield from loader

    def _compute_dense_stats(self) -> DenseStats:
        """Mean and population standard deviation per dense column over the split, NULL as 0."""
        features = self.cfg.dense_features
        total = np.zeros(len(features))
        squares = np.zeros(len(features))
        for path in self.infos:
            table = pq.ParquetFile(path).read(columns=[f.column for f in features])
            for i, feature in enumerate(features):
                values = dense_values(table.column(feature.column), feature.column, path).astype(np.float64)
                total[i] += values.sum()
                squares[i] += np.square(values).sum()
        mean = total / self.num_rows
        std = np.sqrt(np.maximum(squares / self.num_rows - mean**2, 0.0))
        return DenseStats(
            mean={f.column: float(m) for f, m in zip(features, mean)},
            std={f.column: float(s) for f, s in zip(features, std)},
        )

    def _scoring_columns(self) -> dict[str, np.ndarray | None]:
        if self._scoring is not None:
            return self._scoring
        stratum_column = self.cfg.downsampling.stratum_column
        labels, masks, impression_ids, strata = [], [], [], []
        has_stratum = False
        for path in self.infos:
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            columns = ["impression_id", *self.cfg.label_columns]
            if stratum_column and stratum_column in names:
                columns.append(stratum_column)
            table = parquet.read(columns=columns)
            pairs = [label_values(table.column(c)) for c in self.cfg.label_columns]
            labels.append(np.stack([p[0] for p in pairs], axis=1))
            masks.append(np.stack([p[1] for p in pairs], axis=1))
            impression_ids.append(table.column("impression_id").to_numpy().astype(np.int64))
            if stratum_column and stratum_column in names:
                has_stratum = True
                values = table.column(stratum_column).cast(pa.string()).fill_null("__null__")
                strata.append(np.asarray(values.to_numpy(zero_copy_only=False)))
            elif stratum_column:
                strata.append(np.full(table.num_rows, "__null__", dtype=object))

        self._scoring = {
            "labels": np.concatenate(labels),
            "label_mask": np.concatenate(masks),
            "impression_id": np.concatenate(impression_ids),
            "stratum_value": np.concatenate(strata) if has_stratum else None,
        }
        return self._scoring
