"""Plan which rows go into which batch, from Parquet metadata alone.

A plan is a pure function of the row-group sizes, the seed, the epoch, the rank, the world
size and the loader settings (batch size, streams, shuffle, shuffle buffer rows). It never
depends on worker timing, so a run that skips the first k batches of an epoch gets exactly
the batches that an uninterrupted epoch yields after them.

Terms:
    row group: one Parquet row group, the unit of reading.
    row range: rows [start, stop) of one row group.
    stream: the rows that one DataLoader worker reads, batches and shuffles. A rank with S
        streams yields batch j from stream j % S, which is the order in which
        torch.utils.data.DataLoader returns the batches of S workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RowGroup:
    """One non-empty Parquet row group and the position of its first row in the split."""

    path: str
    index: int
    num_rows: int
    first_row: int


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of ``groups[group]``, counted from the row group's first row."""

    group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def epoch_order(groups: list[RowGroup], epoch: int, seed: int, shuffle: bool) -> list[RowRange]:
    """Return every row group as a whole range, in a seeded random order per epoch if ``shuffle``.

    All ranks compute the same order, because the rank split below cuts this one sequence.
    """
    order = np.arange(len(groups))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    return [RowRange(int(g), 0, groups[g].num_rows) for g in order]


def cut(ranges: list[RowRange], begin: int, end: int) -> list[RowRange]:
    """Return rows [begin, end) of the concatenation of ``ranges``, as ranges in the same order."""
    out = []
    position = 0
    for piece in ranges:
        lo = max(begin, position)
        hi = min(end, position + piece.num_rows)
        if lo < hi:
            out.append(RowRange(piece.group, piece.start + lo - position, piece.start + hi - position))
        position += piece.num_rows
        if position >= end:
            break
    return out


def rows_per_rank(total_rows: int, world_size: int) -> int:
    """Training rows per rank per epoch: equal on every rank, so that no rank waits in a collective.

    The ``total_rows % world_size`` rows left over are skipped for that epoch. The row-group
    order changes every epoch when shuffling, so different rows are skipped each time.
    """
    return total_rows // world_size


def rank_ranges(
    groups: list[RowGroup], epoch: int, seed: int, rank: int, world_size: int, shuffle: bool
) -> list[RowRange]:
    """Return this rank's training rows for ``epoch``: a contiguous cut of the epoch's row-group order.

    Every rank gets ``rows_per_rank`` rows. Cutting one sequence balances the ranks by row
    count, not by row-group count, so fewer row groups than ranks still gives every rank rows.
    """
    total = sum(g.num_rows for g in groups)
    per_rank = rows_per_rank(total, world_size)
    order = epoch_order(groups, epoch, seed, shuffle)
    return cut(order, rank * per_rank, (rank + 1) * per_rank)


def num_batches(num_rows: int, batch_size: int) -> int:
    """Batches for ``num_rows`` rows, the last one partial."""
    return -(-num_rows // batch_size)


def stream_rows(num_rows: int, batch_size: int, streams: int) -> list[int]:
    """Rows that each stream reads so that stream s produces exactly batches s, s + S, s + 2S, ...

    Batch j contains ``batch_size`` rows, except the last one, which contains the rest. Its stream
    (``(num_batches - 1) % S``) reads that many fewer rows.
    """
    total_batches = num_batches(num_rows, batch_size)
    rows = []
    for stream in range(streams):
        batches = len(range(stream, total_batches, streams))
        rows.append(batches * batch_size)
    if total_batches:
        rows[(total_batches - 1) % streams] -= total_batches * batch_size - num_rows
    return rows


def split_streams(ranges: list[RowRange], batch_size: int, streams: int) -> list[list[RowRange]]:
    """Cut a rank's ranges into one contiguous piece per stream, sized by ``stream_rows``."""
    total = sum(r.num_rows for r in ranges)
    out = []
    begin = 0
    for rows in stream_rows(total, batch_size, streams):
        out.append(cut(ranges, begin, begin + rows))
        begin += rows
    return out


def batch_positions(
    range_sizes: Iterable[int], batch_size: int, buffer_rows: int, rng: np.random.Generator | None
) -> Iterator[np.ndarray]:
    """Yield each batch as sorted positions into the concatenation of the ranges.

    Without ``rng`` the batches are consecutive rows. With ``rng`` the rows pass through a
    shuffle buffer: whenever it contains at least ``buffer_rows + batch_size`` rows, it is
    permuted and batches are taken from the front until ``buffer_rows`` rows remain, which then
    mix with the next range. The rest is permuted and emitted at the end. Positions within a
    batch are sorted, so a batch reads each row group in one ascending pass; which rows share a
    batch is what the shuffle decides.

    ``range_sizes`` is consumed lazily, one range at a time, so a reader that learns the sizes
    while reading (petastorm) can feed it.
    """
    if rng is None:
        position = 0
        pending = 0
        for size in range_sizes:
            pending += size
            while pending >= batch_size:
                yield np.arange(position, position + batch_size, dtype=np.int64)
                position += batch_size
                pending -= batch_size
        if pending:
            yield np.arange(position, position + pending, dtype=np.int64)
        return

    buffer = np.zeros(0, dtype=np.int64)
    next_position = 0
    for size in range_sizes:
        buffer = np.concatenate([buffer, np.arange(next_position, next_position + size, dtype=np.int64)])
        next_position += size
        if len(buffer) < buffer_rows + batch_size:
            continue

        buffer = rng.permutation(buffer)
        ready = (len(buffer) - buffer_rows) // batch_size
        for i in range(ready):
            yield np.sort(buffer[i * batch_size : (i + 1) * batch_size])
        buffer = buffer[ready * batch_size :]

    buffer = rng.permutation(buffer)
    for start in range(0, len(buffer), batch_size):
        yield np.sort(buffer[start : start + batch_size])


def stream_seed(seed: int, epoch: int, rank: int, stream: int) -> list[int]:
    """Seed of one stream's shuffle buffer: distinct per epoch, rank and stream."""
    return [seed, epoch, rank, stream, 1]
