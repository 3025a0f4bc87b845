"""Date-partitioned Parquet output that replaces an earlier output in one atomic step.

A job builds its complete new output in a staging folder ``.<name>.staging-<run id>`` and
checks it. The staging folder is a sibling of the output folder, so both lie on one file
system, and ``renameat2(RENAME_EXCHANGE)`` then swaps the two folders.
Readers see either the whole earlier output or the whole new one: a job killed before the
swap leaves the earlier output untouched, and the next run deletes the stale staging folder.

Data folders are partitioned by the UTC date of the row's timestamp (``dt=YYYY-MM-DD``).
Within a date, rows are spread over ``ceil(rows / file_rows)`` files, and each file is cut
into row groups of at most ``row_group_rows`` rows, so readers can split a date across
ranks by file or by row group.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

logger = logging.getLogger(__name__)

PARTITION_COLUMN = "dt"
"""Name of the date partition column and folder prefix (``dt=2022-04-20``)."""

DEFAULT_ROW_GROUP_ROWS = 65_536
"""Maximum rows per Parquet row group: small enough to split a file across ranks, large enough for fast scans."""

DEFAULT_FILE_ROWS = 1_048_576
"""Target rows per file within one date partition."""

_MICROS_PER_DAY = 86_400 * 1_000_000
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SALT = "_vr_file_salt"


class CommitError(RuntimeError):
    """The staged output could not be swapped in; the earlier output is still in place."""


def partition_date(timestamp: Column) -> Column:
    """Return the UTC date of ``timestamp`` as a ``YYYY-MM-DD`` string.

    The date comes from integer arithmetic on microseconds since the epoch, so neither the
    session time zone nor the JVM or machine time zone can shift it.
    """
    days = F.floor(F.unix_micros(timestamp) / F.lit(_MICROS_PER_DAY)).cast("int")
    return F.date_from_unix_date(days).cast("string")


def positive_int(text: str) -> int:
    """Parse a positive integer for argparse."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--row-group-rows`` and ``--file-rows`` to a job's command line."""
    parser.add_argument(
        "--row-group-rows", type=positive_int, default=DEFAULT_ROW_GROUP_ROWS,
        help=f"maximum rows per Parquet row group (default {DEFAULT_ROW_GROUP_ROWS})",
    )
    parser.add_argument(
        "--file-rows", type=positive_int, default=DEFAULT_FILE_ROWS,
        help=f"target rows per output file within one date (default {DEFAULT_FILE_ROWS})",
    )


# --- staging -----------------------------------------------------------------


def staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-"


def _old_prefix(out: Path) -> str:
    return f".{out.name}.old-"


def recover_and_clean(out: Path) -> None:
    """Clear what an interrupted earlier run left next to ``out``.

    Stale staging folders are deleted. When the output folder is missing but a folder
    moved aside by the non-atomic fallback of ``commit`` exists, that folder is moved back,
    because it is the last complete output.
    """
    parent = out.parent
    if not parent.exists():
        return
    olds = sorted(p for p in parent.iterdir() if p.name.startswith(_old_prefix(out)))
    if not out.exists() and olds:
        logger.warning("restoring %s from %s, which an interrupted run moved aside", out, olds[-1])
        os.rename(olds[-1], out)
        olds = olds[:-1]
    for path in olds + [p for p in parent.iterdir() if p.name.startswith(staging_prefix(out))]:
        logger.info("deleting %s, left by an interrupted run", path)
        shutil.rmtree(path)


def new_staging_folder(out: Path) -> Path:
    """Return a new staging folder path next to ``out``; the Spark write creates the folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f"{staging_prefix(out)}{uuid.uuid4().hex[:12]}"


def discard(stage: Path) -> None:
    """Delete a staging folder after a failed run, so that only the earlier output remains."""
    shutil.rmtree(stage, ignore_errors=True)


# --- writing -----------------------------------------------------------------


def write_partitioned(
    spark: SparkSession,
    frame: DataFrame,
    path: Path,
    rows_per_date: dict[str, int],
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    file_rows: int = DEFAULT_FILE_ROWS,
) -> None:
    """Write ``frame``, which has a ``dt`` column and ``impression_id``, to ``path`` partitioned by ``dt``.

    ``rows_per_date`` (rows each date will have) sets the file count per date. Rows go to
    files by a hash of their impression id, so a large date is written by many tasks and a
    small date is one file. Timestamps are written as TIMESTAMP_MICROS.
    """
    files = {date: max(1, math.ceil(rows / file_rows)) for date, rows in rows_per_date.items() if rows}
    if files:
        entries = [item for date, count in sorted(files.items()) for item in (F.lit(date), F.lit(count))]
        per_date = F.create_map(*entries)[F.col(PARTITION_COLUMN)]
        salt = F.pmod(F.xxhash64(F.col("impression_id")), F.coalesce(per_date, F.lit(1)))
    else:
        salt = F.lit(0)
    spread = frame.withColumn(_SALT, salt).repartition(max(1, sum(files.values())), PARTITION_COLUMN, _SALT).drop(_SALT)

    key = "spark.sql.parquet.outputTimestampType"
    previous = spark.conf.get(key)
    spark.conf.set(key, "TIMESTAMP_MICROS")
    try:
        (
            spread.write.mode("errorifexists")
            .option("parquet.block.row.count.limit", str(row_group_rows))
            .option("maxRecordsPerFile", str(file_rows))
            .partitionBy(PARTITION_COLUMN)
            .parquet(str(path))
        )
    finally:
        spark.conf.set(key, previous)


def date_folders(path: Path) -> dict[str, Path]:
    """Return {date: folder} for the ``dt=`` folders directly under ``path``."""
    if not path.is_dir():
        return {}
    prefix = f"{PARTITION_COLUMN}="
    return {p.name[len(prefix):]: p for p in sorted(path.iterdir()) if p.is_dir() and p.name.startswith(prefix)}


def footer_rows_per_date(path: Path) -> dict[str, int]:
    """Return the rows per date folder under ``path``, read from the Parquet footers."""
    rows = {}
    for date, folder in date_folders(path).items():
        total = 0
        for file in sorted(folder.rglob("*")):
            if file.is_file() and not file.name.startswith(("_", ".")):
                total += pq.read_metadata(file).num_rows
        rows[date] = total
    return rows


def link_date_folders(source: Path, target: Path, dates: list[str]) -> None:
    """Hard-link (or copy, where links fail) the given date folders of ``source`` into ``target``."""
    folders = date_folders(source)
    for date in dates:
        shutil.copytree(folders[date], target / folders[date].name, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# --- commit ------------------------------------------------------------------


def _exchange(first: Path, second: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def commit(stage: Path, out: Path) -> None:
    """Replace ``out`` with the complete folder ``stage`` in one step, then delete the earlier output.

    Without an earlier output this is one rename. With one, both folders are swapped by
    ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15 or newer, on local file systems such as
    ext4, xfs, btrfs and tmpfs). Where the exchange is not supported, the earlier output
    is renamed aside and the staging folder renamed into place. A crash between those two
    renames leaves no output folder, and ``recover_and_clean`` moves the earlier one back.
    """
    if not out.exists():
        os.rename(stage, out)
        return

    try:
        _exchange(stage, out)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise CommitError(f"could not swap {stage} with {out}: {error}; the earlier output is unchanged") from error
        # NOTE: this fallback is not atomic for readers: for a moment the output folder is missing.
        logger.warning("atomic exchange unsupported here (%s); replacing %s with two renames", error, out)
        aside = out.parent / f"{_old_prefix(out)}{stage.name.rsplit('-', 1)[-1]}"
        os.rename(out, aside)
        os.rename(stage, out)
        shutil.rmtree(aside)
        return

    # The earlier output now sits at the staging path.
    shutil.rmtree(stage)
