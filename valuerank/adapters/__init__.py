"""Converters from public logged datasets to the raw impression and event logs.

Every converter, and the synthetic generator in ``valuerank.synthetic``, writes
``<out>/impressions/part-0.parquet`` and ``<out>/events/part-0.parquet`` with
``write_raw_logs``: ids as int64, timestamps as ``timestamp[ms, tz=UTC]`` and the
action as a string. The configs in ``configs/`` read these files with the default
column names and ``columns.timestamp_unit = "ms"``.

Converters:

- ``valuerank.adapters.kuairand``: the KuaiRand like/hate log (one TSV row per impression).
- ``valuerank.adapters.open_bandit``: the Open Bandit Dataset random/all sample.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")
"""Type of every timestamp column in the raw logs."""

PART_FILE = "part-0.parquet"

IMPRESSION_COLUMNS = {
    "impression_id": pa.int64(),
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "timestamp": TIMESTAMP_TYPE,
}
"""Columns that every impression log has; any other column is a passthrough feature."""

EVENT_COLUMNS = {
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "action": pa.string(),
    "timestamp": TIMESTAMP_TYPE,
}
"""Columns that every event log has; ``impression_id`` (int64, nullable) is optional."""


def timestamp_array(epoch_ms: np.ndarray) -> pa.Array:
    """Convert integer epoch milliseconds to a UTC timestamp array."""
    return pa.array(np.asarray(epoch_ms, dtype=np.int64), type=TIMESTAMP_TYPE)


def iso_utc(epoch_ms: int) -> str:
    """Format epoch milliseconds as ISO 8601 UTC text, for summaries."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).isoformat()


def stable_id(text: str) -> int:
    """Hash ``text`` to a non-negative int64 that is the same in every process.

    Python's built-in ``hash`` of a string changes between processes (PYTHONHASHSEED),
    so ids derived from it would differ between two conversions of the same file.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def write_raw_logs(out_dir: str | Path, impressions: pa.Table, events: pa.Table) -> dict[str, str]:
    """Check both logs against the raw input schema and write one Parquet file each.

    Returns the paths written, keyed ``impressions`` and ``events``. Raises
    ``FileExistsError`` when a log folder already contains other files, because
    Spark and pyarrow read every file of the folder as part of the log.
    """
    _check_schema(impressions, IMPRESSION_COLUMNS, "impressions")
    _check_schema(events, EVENT_COLUMNS, "events")
    if "impression_id" in events.column_names:
        _check_type(events, "impression_id", pa.int64(), "events")

    paths = {}
    for name, table in (("impressions", impressions), ("events", events)):
        folder = Path(out_dir) / name
        _check_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PART_FILE
        pq.write_table(table, path)
        logger.info("wrote %d rows to %s", table.num_rows, path)
        paths[name] = str(path)
    return paths


def _check_schema(table: pa.Table, columns: dict[str, pa.DataType], log: str) -> None:
    for column, expected in columns.items():
        if column not in table.column_names:
            raise ValueError(
                f"{log} log: missing column {column!r}; columns present: {', '.join(table.column_names)}"
            )
        _check_type(table, column, expected, log)


def _check_type(table: pa.Table, column: str, expected: pa.DataType, log: str) -> None:
    actual = table.schema.field(column).type
    if actual != expected:
        raise ValueError(f"{log} log: column {column!r} has type {actual}; expected {expected}")


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        return
    other = sorted(p.name for p in folder.iterdir() if p.name != PART_FILE)
    if other:
        raise FileExistsError(
            f"{folder} already contains {', '.join(other)}; remove them or choose another output "
            "folder, because readers of the folder would take them as part of the log"
        )
