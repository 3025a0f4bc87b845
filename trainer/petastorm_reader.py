"""Read a split through ``petastorm.make_batch_reader`` (``training.reader = "petastorm"``).

petastorm needs its own environment: every release imports ``pyarrow.filesystem``, which
pyarrow 15 removed, and petastorm 0.13.1 requires setuptools<70 while torch 2.13 requires
setuptools>=77. ``requirements/petastorm.txt`` pins petastorm 0.12.1 with pyarrow 14.0.2,
numpy 1.26.4 and pandas 2.2.3; ``make petastorm-venv`` installs it into ``.venv-petastorm``.

Rank r reads petastorm shard r (``cur_shard = r``, ``shard_count = world_size``), which
petastorm assigns by row-group index modulo the shard count, so shards differ in rows. Every
rank pads its epoch with masked rows up to the largest shard, which keeps the step count
equal on all ranks and still trains on every row once per epoch. File listing, column
checks, dense statistics and the columns for scoring come from the native loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainer.arrow_chunks import Chunk, concat_batches, decode, gather, padding
from trainer.batch_plan import batch_positions, num_batches, stream_seed
from trainer.data import Batch, DataError, DenseStats, batch_from_parts
from trainer.loader import SplitData
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)

# Column added next to each list column: the list's length before padding.
LENGTH_SUFFIX = "__length"

MISSING_PETASTORM = (
    "training.reader = 'petastorm' needs petastorm 0.12.1, which is not importable here. It runs only "
    "with pyarrow < 15, so it lives in a separate environment: run `make petastorm-venv` (creates "
    ".venv-petastorm from requirements/petastorm.txt) and train with .venv-petastorm/bin/python, "
    "or set training.reader = 'native'")


def import_make_batch_reader():
    """Return ``petastorm.make_batch_reader``, or raise DataError naming the environment to use."""
    try:
        from petastorm import make_batch_reader
    except ImportError as error:
        raise DataError(f"{MISSING_PETASTORM} ({error})") from error
    return make_batch_reader


def _no_data_error() -> type[Exception]:
    from petastorm.errors import NoDataAvailableError

    return NoDataAvailableError


class PetastormSplit(SplitData):
    """One split read by petastorm; the same interface and Batch layout as the native loader."""

    def __init__(self, path: str | Path, cfg: PipelineConfig, dense_stats: DenseStats | None = None):
        self._make_batch_reader = import_make_batch_reader()
        super().__init__(path, cfg, dense_stats)
        # Explicit file URLs, so that petastorm reads exactly the files the native loader
        # lists: no empty files, no _-prefixed names, no dt= partition column.
        self.urls = [f"file://{Path(p).resolve()}" for p in self.infos]
        self.columns = sorted({c for info in self.infos.values() for c in info.columns if all(c in i.columns for i in self.infos.values())})
        self._shard_rows: dict[int, list[int]] = {}
        self._id_columns = {"impression_id", *(f.column for f in cfg.sparse_features)}
        schema = pq.ParquetFile(next(iter(self.infos))).schema_arrow
        self._list_columns = [
            f.column for f in cfg.sparse_features
            if pa.types.is_list(schema.field(f.column).type) or pa.types.is_large_list(schema.field(f.column).type)
        ]
        # Scoring needs impression_id -> split position, since petastorm does not return positions.
        self._id_order = np.argsort(self.impression_id, kind="stable")
        self._sorted_ids = self.impression_id[self._id_order]

    def _reader(self, rank: int, world_size: int, shuffle: bool, seed: int | None, columns: list[str]):
        from petastorm import TransformSpec

        NoDataAvailableError = _no_data_error()
        lists = [c for c in self._list_columns if c in columns]
        transform = None
        if lists:
            transform = TransformSpec(
                lambda frame: _pad_lists(frame, lists),
                edit_fields=[(c + LENGTH_SUFFIX, np.int64, (), False) for c in lists],
            )
        try:
            return self._make_batch_reader(
                self.urls,
                schema_fields=columns,
                transform_spec=transform,
                reader_pool_type="thread",
                # One worker keeps the row-group order a function of the seed.
                workers_count=1,
                shuffle_row_groups=shuffle,
                seed=seed,
                cur_shard=rank if world_size > 1 else None,
                shard_count=world_size if world_size > 1 else None,
                num_epochs=1,
            )
        except NoDataAvailableError as error:
            raise DataError(
                f"{self.path}: petastorm shards by row group, and {len(self.groups)} row groups cannot "
                f"feed {world_size} ranks; use training.reader = 'native', fewer ranks, or write smaller row groups"
            ) from error

    def shard_rows(self, world_size: int) -> list[int]:
        """Rows that petastorm gives each rank, counted once per world size by reading impression_id."""
        if world_size not in self._shard_rows:
            counts = []
            for rank in range(world_size):
                with self._reader(rank, world_size, False, None, ["impression_id"]) as reader:
                    counts.append(sum(len(batch.impression_id) for batch in reader))
            self._shard_rows[world_size] = counts
        return self._shard_rows[world_size]

    def num_train_batches(self, world_size: int, batch_size: int) -> int:
        return num_batches(max(self.shard_rows(world_size)), batch_size)

    def train_batches(
        self, epoch: int, rank: int, world_size: int, batch_size: int, seed: int, start_batch: int = 0
    ) -> Iterator[Batch]:
        """Yield rank ``rank``'s batches of ``epoch`` from batch ``start_batch`` on, padded to the largest shard."""
        train = self.cfg.training
        rng = np.random.default_rng(stream_seed(seed, epoch, rank, 0)) if train.shuffle else None
        reader_seed = seed * 1_000_003 + epoch if train.shuffle else None
        with self._reader(rank, world_size, train.shuffle, reader_seed, self.columns) as reader:
            real = self._batches(reader, batch_size, train.shuffle_buffer_rows, rng)
            padded = self._pad(real, max(self.shard_rows(world_size)), batch_size)
            for j, parts in enumerate(padded):
                if j >= start_batch:
                    yield batch_from_parts(parts, self.cfg)

    def eval_batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[Batch]:
        with self._reader(rank, world_size, False, None, self.columns) as reader:
            real = self._batches(reader, batch_size, 0, None)
            for parts in self._pad(real, max(self.shard_rows(world_size)), batch_size):
                yield batch_from_parts(parts, self.cfg)

    def _batches(self, reader, batch_size: int, buffer_rows: int, rng) -> Iterator[dict[str, torch.Tensor]]:
        """Decode petastorm's batches into chunks and cut them into batches with the shared shuffle plan."""
        chunks: dict[int, Chunk] = {}
        starts: list[int] = []
        pending: list[int] = []

        def sizes() -> Iterator[int]:
            position = 0
            for item in reader:
                chunk = self._decode(item)
                chunks[len(starts)] = chunk
                starts.append(position)
                pending.append(chunk.num_rows)
                position += chunk.num_rows
                yield chunk.num_rows

        num_features = len(self.cfg.sparse_features)
        num_actions = len(self.cfg.actions)
        for positions in batch_positions(sizes(), batch_size, buffer_rows, rng):
            range_ids = np.searchsorted(np.array(starts), positions, side="right") - 1
            ids, first, counts = np.unique(range_ids, return_index=True, return_counts=True)
            pieces = []
            for range_id, begin, count in zip(ids.tolist(), first.tolist(), counts.tolist()):
                pieces.append((chunks[range_id], positions[begin : begin + count] - starts[range_id]))
                pending[range_id] -= count
                if pending[range_id] == 0:
                    del chunks[range_id]
            yield gather(pieces, num_features, num_actions)

    def _pad(self, real: Iterator[dict[str, torch.Tensor]], rows: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        shape = (len(self.cfg.dense_features), len(self.cfg.sparse_features), len(self.cfg.actions))
        for j in range(num_batches(rows, batch_size)):
            size = min(batch_size, rows - j * batch_size)
            parts = next(real, None)
            if parts is None:
                parts = padding(size, *shape)
            elif len(parts["row_index"]) < size:
                parts = concat_batches(parts, padding(size - len(parts["row_index"]), *shape), shape[1])
            yield parts
        if next(real, None) is not None:
            raise RuntimeError("petastorm returned more rows than it did when counting this shard")

    def _decode(self, item) -> Chunk:
        """Turn one petastorm batch (a namedtuple of NumPy columns) into a Chunk."""
        columns = {}
        for name in self.columns:
            values = getattr(item, name)
            if name in self._list_columns:
                columns[name] = _unpad_list(values, getattr(item, name + LENGTH_SUFFIX))
            else:
                # pandas turns NULL integers into NaN floats; from_pandas maps NaN back to NULL.
                columns[name] = pa.array(values, from_pandas=True)
                if name in self._id_columns and pa.types.is_floating(columns[name].type):
                    columns[name] = columns[name].cast(pa.int64())
        table = pa.table(columns)
        chunk = decode(table, self.cfg, self.dense_stats, 0, "petastorm batch")
        ids = np.asarray(table.column("impression_id").to_numpy(zero_copy_only=False)).astype(np.int64)
        chunk.row_index = self._id_order[np.searchsorted(self._sorted_ids, ids)]
        return chunk


def _pad_lists(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Pad each list column to the longest list of the row group and add its lengths.

    petastorm's batch reader stacks a list column into one 2-D array and fails on lists of
    different lengths, so the lists travel padded, with their lengths beside them.
    NOTE: a list with a NULL id arrives from pandas as float64 with NaN, which turns the whole
    padded column into float64; ids of 2**53 or more in such a row group lose precision.
    """
    for column in columns:
        lists = [np.zeros(0, dtype=np.int64) if v is None else np.asarray(v) for v in frame[column]]
        lengths = np.array([len(v) for v in lists], dtype=np.int64)
        width = int(lengths.max(initial=0))
        frame[column] = [np.concatenate([v, np.zeros(width - len(v), dtype=np.int64)]) for v in lists]
        frame[column + LENGTH_SUFFIX] = lengths
    return frame


def _unpad_list(padded: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """Rebuild a list column from its padded 2-D array and lengths, without a loop over rows."""
    padded = padded.reshape(len(lengths), -1)
    keep = np.arange(padded.shape[1])[None, :] < lengths[:, None]
    values = pa.array(padded[keep], from_pandas=True)
    if pa.types.is_floating(values.type):
        values = values.cast(pa.int64())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values)
