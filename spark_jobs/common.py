"""Pieces shared by the Spark jobs: the session, validated Parquet input, manifests and row accounting.

Input files are checked one by one with pyarrow (footers only, no Spark job) before any
Spark work starts, so a bad file fails fast with its path, the column and the fix. Files
with the same schema are then read together and cast to the canonical types: ids to
int64, the timestamp column to a UTC ``TimestampType``.

Paths are local paths or ``file:`` URIs, because the footers are read and the manifests
written with the local file API.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from valuerank.config import ConfigError, PipelineConfig
from valuerank.output_paths import OutputPathError
from valuerank.output_paths import check_output_path as check_local_output_path

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
"""Manifest file name. The leading underscore makes Spark and pyarrow readers of the folder skip it."""

NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"
"""Spark setting that reads nanosecond Parquet timestamps as int64 instead of failing."""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_TO_TIMESTAMP = {"s": F.timestamp_seconds, "ms": F.timestamp_millis, "us": F.timestamp_micros}

ColumnKind = Literal["id", "timestamp", "string"]


class InputSchemaError(ValueError):
    """Invalid job input: a missing or empty path, or a missing or mistyped column. The message names the file, column and fix."""


class EmptyOutputError(ValueError):
    """A job would write no rows, or an empty split, which usually points to a wrong setting. The message names it."""


class AccountingError(RuntimeError):
    """The row counts of a job do not add up, so some rows were lost or duplicated."""


# --- session -----------------------------------------------------------------


def build_session(
    app_name: str,
    master: str | None = None,
    shuffle_partitions: int | None = None,
    ui: bool = True,
) -> SparkSession:
    """Start a Spark session with the settings that the jobs rely on.

    The session time zone is UTC, nanosecond Parquet timestamps are read as int64 (the
    reader converts them), and timestamps are written as TIMESTAMP_MICROS. ``master``
    None leaves the choice to spark-submit (``local[*]`` when it has none). On a local
    master the shuffle partitions default to twice the cores instead of Spark's 200,
    unless ``shuffle_partitions`` or ``--conf spark.sql.shuffle.partitions`` sets them.
    """
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config(NANOS_AS_LONG, "true")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        # Split a join partition that a hot key makes large (docs/data-policies.md, Skew).
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.skewJoin.enabled", "true")
    )
    if master is not None:
        builder = builder.master(master)
    if master is None or master.startswith("local"):
        # A local-mode driver and its UI need no other host, so they listen on loopback only,
        # unless the caller set SPARK_LOCAL_IP. Under spark-submit the JVM already runs and
        # this has no effect.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if shuffle_partitions is not None:
        builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    if not ui:
        builder = builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
    session = builder.getOrCreate()

    context = session.sparkContext
    user_set_partitions = context.getConf().contains("spark.sql.shuffle.partitions")
    if context.master.startswith("local") and not user_set_partitions:
        session.conf.set("spark.sql.shuffle.partitions", str(max(2, 2 * context.defaultParallelism)))
    logger.info(
        "started Spark %s, master %s, shuffle partitions %s",
        session.version,
        context.master,
        session.conf.get("spark.sql.shuffle.partitions"),
    )
    return session


def get_or_create_session(app_name: str, master: str | None = None) -> tuple[SparkSession, bool]:
    """Return the active Spark session, or start one with ``build_session``.

    The flag is True when the session was started here, so the caller knows whether to
    stop it. An active session is reused as it is, and ``master`` is then ignored.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        logger.info("reusing the active Spark session (master %s)", active.sparkContext.master)
        return active, False
    return build_session(app_name, master=master), True


def require_utc_session(spark: SparkSession) -> None:
    """Raise RuntimeError unless the session time zone is UTC, which the timestamp casts rely on."""
    zone = spark.conf.get("spark.sql.session.timeZone")
    if zone not in ("UTC", "Etc/UTC", "Z", "+00:00"):
        raise RuntimeError(
            f"spark.sql.session.timeZone is {zone!r}, but the jobs read and write timestamps as UTC; "
            "start Spark with --conf spark.sql.session.timeZone=UTC"
        )


# --- paths and time ----------------------------------------------------------


def local_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a local ``Path``, accepting ``file:`` URIs and rejecting other schemes."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif text.startswith("file:"):
        text = text[len("file:") :]
    elif "://" in text:
        raise InputSchemaError(
            f"{text}: only local paths and file: URIs are supported; copy the data to a local folder first"
        )
    return Path(text)


def micros_to_datetime(micros: int) -> datetime:
    """Convert microseconds since the epoch to an aware UTC datetime without float rounding."""
    return _EPOCH + timedelta(microseconds=micros)


def datetime_to_micros(value: datetime) -> int:
    """Convert an aware datetime to microseconds since the epoch."""
    delta = value.astimezone(timezone.utc) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso_utc(micros: int | None) -> str | None:
    """Format microseconds since the epoch as ISO 8601 with a ``Z`` suffix."""
    if micros is None:
        return None
    return micros_to_datetime(micros).isoformat().replace("+00:00", "Z")


def quoted(name: str) -> Column:
    """Return the column called ``name``, even when the name contains dots or spaces."""
    return F.col("`" + name.replace("`", "``") + "`")


# --- output paths ------------------------------------------------------------


def check_output_path(job: str, out_path: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> Path:
    """Raise OutputPathError unless ``job`` may write its output to ``out_path``; return the resolved path.

    Spark's overwrite mode deletes the output folder before writing, so the rules of
    ``valuerank.output_paths.check_output_path`` apply. Call it before any Spark work.
    """
    local_inputs = {role: local_path(path) for role, path in inputs.items()}
    return check_local_output_path(job, local_path(out_path), local_inputs, MANIFEST_NAME)


def run_command(job_main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a job's command-line entry; report bad input or config in one log line and return 2."""
    try:
        return job_main(argv)
    except (ConfigError, InputSchemaError, OutputPathError, EmptyOutputError, AccountingError) as error:
        logging.getLogger(job_main.__module__).error("%s", error)
        return 2


# --- feature columns ---------------------------------------------------------


def check_feature_columns(cfg: PipelineConfig, columns: list[str], where: str) -> None:
    """Raise ConfigError for a sparse or dense feature whose column is not in ``columns``.

    ``where`` names the checked data in the message, e.g. ``the labelled input PATH``.
    The trainer reads these columns, so a wrong name would otherwise fail only there.
    """
    present = set(columns)
    features = [
        *(("sparse_features", i, feature.column) for i, feature in enumerate(cfg.sparse_features)),
        *(("dense_features", i, feature.column) for i, feature in enumerate(cfg.dense_features)),
    ]
    for section, i, column in features:
        if column in present:
            continue
        raise ConfigError(
            f"{section}[{i}].column: column {column!r} is not in {where} (columns: {abbreviate(columns)}); "
            f"set {section}[{i}].column to one of these columns, or add the column to the input"
        )


def abbreviate(names: list[str], limit: int = 16) -> str:
    """Join ``names`` with commas, cut after ``limit`` names with a count of the rest."""
    shown = ", ".join(names[:limit])
    if len(names) <= limit:
        return shown
    return f"{shown}, and {len(names) - limit} more"


# --- validated Parquet input -------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    """One column that a job needs from an input log."""

    source: str
    """Column name in the input files (from ``cfg.columns``)."""

    name: str
    """Canonical name after reading, e.g. ``impression_id``."""

    kind: ColumnKind
    """``id``: any integer type, read as int64. ``timestamp``: a Parquet timestamp or an integer
    epoch, read as a UTC timestamp. ``string``: a string column."""

    required: bool = True
    """A required column must be in every file. An optional one is NULL where a file lacks it."""


@dataclass
class ParquetInput:
    """An input log whose files have all passed the schema checks."""

    role: str
    """Name of the log in messages and config keys, e.g. ``impressions``."""

    path: Path
    """The folder or file that was given."""

    specs: list[ColumnSpec]
    """Columns checked and cast by the reader."""

    groups: list[list[Path]] = field(default_factory=list)
    """Files grouped by identical schema. Each group is read with one Spark scan."""

    schemas: list[pa.Schema] = field(default_factory=list)
    """The Arrow schema of each group."""

    rows: int = 0
    """Rows in all files, from the Parquet footers."""

    absent: list[str] = field(default_factory=list)
    """Canonical names of optional columns that no file contains."""

    @property
    def files(self) -> list[Path]:
        """All files of the input."""
        return [file for group in self.groups for file in group]

    def canonical_columns(self) -> list[str]:
        """Return the column names that ``read_parquet_input`` yields with ``keep_other_columns``.

        Spec columns get their canonical names and come first. Other columns follow in
        order of first appearance, then the partition columns of ``key=value`` folders.
        """
        renamed = {spec.source: spec.name for spec in self.specs}
        names = [spec.name for spec in self.specs if spec.name not in self.absent]
        for schema in self.schemas:
            names.extend(name for name in schema.names if name not in renamed and name not in names)
        if self.path.is_dir():
            for file in self.files:
                for part in file.relative_to(self.path).parts[:-1]:
                    key = part.split("=", 1)[0]
                    if "=" in part and key not in names:
                        names.append(key)
        return names


def list_parquet_files(path: str | os.PathLike, role: str) -> tuple[Path, list[Path]]:
    """Return the input path and the data files under it, in sorted order.

    Like Spark, names starting with ``_`` or ``.`` (``_SUCCESS``, ``_manifest.json``,
    hidden files) are skipped, at any depth.
    """
    root = local_path(path)
    if not root.exists():
        raise InputSchemaError(f"{role} input not found: {root}; pass an existing Parquet file or folder")
    if root.is_file():
        return root, [root]

    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(("_", ".")))
        files.extend(Path(folder) / name for name in sorted(names) if not name.startswith(("_", ".")))
    if not files:
        raise InputSchemaError(f"{role} input {root} contains no Parquet files")
    return root, files


def inspect_parquet_input(
    role: str,
    path: str | os.PathLike,
    specs: list[ColumnSpec],
    config_section: str,
    timestamp_unit: str,
    reserved: tuple[str, ...] = (),
) -> ParquetInput:
    """Check the schema of every file under ``path`` against ``specs``, reading only the Parquet footers.

    Raise InputSchemaError naming the first bad file, the column and the fix. Names in
    ``reserved`` are output columns of the job, which an input column must not take.
    The fix for a missing column quotes ``config_section`` (e.g. ``columns.impressions``).
    """
    root, files = list_parquet_files(path, role)
    result = ParquetInput(role=role, path=root, specs=specs)
    by_schema: dict[tuple, int] = {}
    seen: set[str] = set()

    for file in files:
        try:
            metadata = pq.read_metadata(file)
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as error:
            raise InputSchemaError(
                f"{file}: not a readable Parquet file ({error}); remove it from the {role} input"
            ) from error
        _check_file_schema(file, schema, role, specs, config_section, timestamp_unit, reserved)
        result.rows += metadata.num_rows
        seen.update(schema.names)

        key = tuple((f.name, str(f.type)) for f in schema)
        if key not in by_schema:
            by_schema[key] = len(result.groups)
            result.groups.append([])
            result.schemas.append(schema)
        result.groups[by_schema[key]].append(file)

    result.absent = [spec.name for spec in specs if not spec.required and spec.source not in seen]
    logger.info(
        "%s: %d files in %d schema groups, %d rows, from %s",
        role, len(files), len(result.groups), result.rows, root,
    )
    return result


def _check_file_schema(
    file: Path,
    schema: pa.Schema,
    role: str,
    specs: list[ColumnSpec],
    config_section: str,
    timestamp_unit: str,
    reserved: tuple[str, ...],
) -> None:
    names = set(schema.names)
    sources = {spec.source for spec in specs}

    for spec in specs:
        if spec.source not in names:
            if not spec.required:
                continue
            raise InputSchemaError(
                f"{file}: missing column {spec.source!r} ({role} {spec.name}); add it to the file, or set "
                f"{config_section}.{spec.name} to the column that holds it. "
                f"Columns in this file: {', '.join(schema.names)}"
            )
        _check_column_type(file, schema.field(spec.source).type, role, spec, timestamp_unit)

        renamed_onto = spec.name != spec.source and spec.name in names and spec.name not in sources
        if renamed_onto:
            raise InputSchemaError(
                f"{file}: column {spec.name!r} clashes with column {spec.source!r}, which is read as "
                f"{spec.name!r}; rename or drop column {spec.name!r} in the {role} input"
            )

    for name in schema.names:
        if name in reserved and name not in sources:
            raise InputSchemaError(
                f"{file}: column {name!r} has the name of an output column of this job; "
                f"rename or drop it in the {role} input"
            )


def _check_column_type(file: Path, arrow_type: pa.DataType, role: str, spec: ColumnSpec, timestamp_unit: str) -> None:
    where = f"{file}: column {spec.source!r} ({role} {spec.name})"
    if spec.kind == "id":
        if pa.types.is_integer(arrow_type) or (pa.types.is_null(arrow_type) and not spec.required):
            return
        if _is_string(arrow_type):
            raise InputSchemaError(
                f"{where} has type {arrow_type}, but ids must be integers; map the string ids to "
                "int64 (for example with a lookup table or a 64-bit hash) before this job"
            )
        raise InputSchemaError(
            f"{where} has type {arrow_type}, but ids must be integers; cast the column to int64 "
            "before this job"
        )

    if spec.kind == "timestamp":
        if pa.types.is_integer(arrow_type):
            return
        if pa.types.is_timestamp(arrow_type):
            return
        raise InputSchemaError(
            f"{where} has type {arrow_type}; expected a Parquet timestamp or an integer epoch in "
            f"columns.timestamp_unit ({timestamp_unit!r}). Convert the column to one of these, or "
            "change columns.timestamp_unit if the epoch unit differs"
        )

    if not _is_string(arrow_type):
        raise InputSchemaError(f"{where} has type {arrow_type}; expected a string; cast the column to string")


def _is_string(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def read_parquet_input(
    spark: SparkSession,
    source: ParquetInput,
    timestamp_unit: str,
    keep_other_columns: bool,
) -> DataFrame:
    """Read a checked input with canonical names and types, one Spark scan per schema group.

    Spec columns come first, in spec order. Optional columns that no file contains are
    left out. With ``keep_other_columns``, every other column follows unchanged, and a
    column that only some files have is NULL for the rest. Nanosecond timestamps, which
    Spark reads as int64, are converted back to timestamps with microsecond precision.
    """
    require_utc_session(spark)
    frames = []
    for files, schema in zip(source.groups, source.schemas):
        _check_nanos_readable(spark, schema, files[0], source.role)
        reader = spark.read
        if source.path.is_dir():
            # basePath keeps the partition columns of a key=value folder layout.
            reader = reader.option("basePath", str(source.path))
        frame = reader.parquet(*(str(file) for file in files))
        frames.append(_canonical_columns(frame, schema, source, timestamp_unit, keep_other_columns))

    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame, allowMissingColumns=True)

    spec_names = [spec.name for spec in source.specs if spec.name not in source.absent]
    others = [name for name in result.columns if name not in spec_names]
    return result.select(*[quoted(name) for name in spec_names + others])


def _is_nanos(arrow_type: pa.DataType) -> bool:
    return pa.types.is_timestamp(arrow_type) and arrow_type.unit == "ns"


def _check_nanos_readable(spark: SparkSession, schema: pa.Schema, file: Path, role: str) -> None:
    if spark.conf.get(NANOS_AS_LONG, "false").lower() == "true":
        return
    for f in schema:
        if _is_nanos(f.type):
            raise InputSchemaError(
                f"{file}: column {f.name!r} of the {role} input contains nanosecond timestamps, which this "
                f"Spark session cannot read; start Spark with --conf {NANOS_AS_LONG}=true (the jobs' own "
                "sessions set it), or write the files with microsecond timestamps"
            )


def _canonical_columns(
    frame: DataFrame,
    schema: pa.Schema,
    source: ParquetInput,
    timestamp_unit: str,
    keep_other_columns: bool,
) -> DataFrame:
    columns = []
    sources = {spec.source for spec in source.specs}
    for spec in source.specs:
        if spec.name in source.absent:
            continue
        if spec.source not in schema.names:
            spark_type = {"id": "bigint", "timestamp": "timestamp", "string": "string"}[spec.kind]
            columns.append(F.lit(None).cast(spark_type).alias(spec.name))
            continue

        column = quoted(spec.source)
        if spec.kind == "id":
            column = column.cast("bigint")
        elif spec.kind == "string":
            column = column.cast("string")
        else:
            column = _to_timestamp(column, schema.field(spec.source).type, timestamp_unit)
        columns.append(column.alias(spec.name))

    if not keep_other_columns:
        return frame.select(*columns)
    for name in frame.columns:
        if name in sources:
            continue
        is_file_column = name in schema.names
        if is_file_column and _is_nanos(schema.field(name).type):
            columns.append(_to_timestamp(quoted(name), schema.field(name).type, timestamp_unit).alias(name))
        else:
            columns.append(quoted(name))
    return frame.select(*columns)


def _to_timestamp(column: Column, arrow_type: pa.DataType, timestamp_unit: str) -> Column:
    if pa.types.is_integer(arrow_type):
        return _EPOCH_TO_TIMESTAMP[timestamp_unit](column.cast("bigint"))

    if _is_nanos(arrow_type):
        # With nanosAsLong, Spark yields int64 nanoseconds. Decimal division keeps every digit.
        return F.timestamp_micros(F.floor(column.cast("decimal(20,0)") / 1000).cast("bigint"))

    # A timestamp without a time zone (timestamp_ntz) is taken as UTC because the session is UTC.
    return column.cast("timestamp")


# --- output, manifests and row accounting ------------------------------------


def write_parquet(spark: SparkSession, frame: DataFrame, path: str | os.PathLike) -> None:
    """Write ``frame`` to ``path`` as Parquet, replacing what is there, with TIMESTAMP_MICROS timestamps.

    The timestamp setting is restored after the write, so a reused session keeps its own.
    """
    key = "spark.sql.parquet.outputTimestampType"
    previous = spark.conf.get(key)
    spark.conf.set(key, "TIMESTAMP_MICROS")
    try:
        frame.write.mode("overwrite").parquet(str(local_path(path)))
    finally:
        spark.conf.set(key, previous)


def manifest_path(out_path: str | os.PathLike) -> Path:
    """Return the manifest location of the output folder ``out_path``."""
    return local_path(out_path) / MANIFEST_NAME


def remove_manifest(out_path: str | os.PathLike) -> None:
    """Delete an old manifest, so a failed rerun never leaves one that describes other files."""
    manifest_path(out_path).unlink(missing_ok=True)


def write_manifest(out_path: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest`` as JSON to ``<out_path>/_manifest.json``, atomically, and return the path."""
    target = manifest_path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix="._manifest.", dir=target.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(manifest, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, target)
    logger.info("wrote %s", target)
    return target


def read_manifest(out_path: str | os.PathLike) -> dict:
    """Read the manifest of the output folder ``out_path``."""
    return json.loads(manifest_path(out_path).read_text())


def count_by(frame: DataFrame, *columns: str) -> dict:
    """Count rows per distinct value of ``columns`` in one Spark job.

    Keys are plain values for one column and tuples for several. NULL is a key like any value.
    """
    counts = {}
    for row in frame.groupBy(*columns).count().collect():
        key = row[columns[0]] if len(columns) == 1 else tuple(row[column] for column in columns)
        counts[key] = row["count"]
    return counts


def check_balance(what: str, rows_in: int, parts: dict[str, int]) -> None:
    """Raise AccountingError unless the counts in ``parts`` add up to ``rows_in``."""
    total = sum(parts.values())
    if total != rows_in:
        detail = ", ".join(f"{name} {count}" for name, count in parts.items())
        raise AccountingError(
            f"{what}: {rows_in} rows in, but the outcomes add up to {total} ({detail}); "
            "rows were lost or duplicated, so the output is not trustworthy"
        )
