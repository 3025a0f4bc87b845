"""Label each impression with the actions that followed it within their attribution windows.

Run from the repository root with the virtual environment active (``make venv`` creates it and
installs the package), so that spark-submit runs the job with that Python::

    spark-submit --master 'local[*]' spark_jobs/label_join.py --config configs/demo.toml --impressions PATH --events PATH --out PATH [--as-of 2022-04-21T00:00:00Z]

On a cluster, pass its master and any ``--conf`` pairs to spark-submit; the job keeps them and
sets only the session time zone (UTC) and the Parquet timestamp settings itself. Paths must be
on a filesystem that the driver and every executor mount at the same place::

    spark-submit --master yarn --deploy-mode cluster --conf spark.executor.instances=8 \\
        --conf spark.pyspark.python=./venv/bin/python --archives venv.tar.gz#venv --files pipeline.toml \\
        spark_jobs/label_join.py --config pipeline.toml --impressions /mnt/logs/impressions \\
        --events /mnt/logs/events --out /mnt/runs/r1/labelled

    spark-submit --master k8s://https://KUBERNETES_API:6443 --deploy-mode cluster \\
        --conf spark.kubernetes.container.image=valuerank:0.1.0-cpu \\
        --conf spark.kubernetes.authenticate.driver.serviceAccountName=valuerank-spark \\
        local:///opt/valuerank/spark_jobs/label_join.py --config /data/pipeline.toml \\
        --impressions /data/raw/impressions --events /data/raw/events --out /data/runs/k8s/labelled

docs/clusters.md gives the volume settings of the Kubernetes command, and k8s/ the same job as a
SparkApplication for the Spark operator.

Attribution of one event (all times in UTC, window ends inclusive):

- An event with an impression id goes to that impression when the event time lies in
  [impression time, impression time + attribution window of the event's action].
  Such an event never falls back to matching by user and item.
- An event without an impression id goes to the latest impression of the same user and
  item at or before the event time, if the event lies within that impression's window.
  Of several impressions at the same time, the larger impression id wins.
- Copies of an event (same user, item, action, timestamp and impression id) count once.

An impression whose window for any action is still open at ``as_of`` (impression time +
maximum attribution window > as_of) is held back rather than labelled negative. ``as_of`` defaults to
the latest event time, or the latest impression time when there are no events.

Every input row ends in exactly one outcome, and ``<out>/_manifest.json`` counts them.
An impression is labelled, held back or dropped. An event is attributed, attributed to a
held-back impression, or dropped. ``IMPRESSION_DROP_REASONS`` and ``EVENT_DROP_REASONS``
list the drop reasons, and a row gets the first reason that applies, in list order.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from functools import reduce
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import AtomicType, VariantType

from spark_jobs.common import (
    ColumnSpec,
    EmptyOutputError,
    InputSchemaError,
    ParquetInput,
    check_balance,
    check_feature_columns,
    check_output_path,
    datetime_to_micros,
    get_or_create_session,
    inspect_parquet_input,
    iso_utc,
    quoted,
    read_parquet_input,
    require_utc_session,
    run_command,
    write_manifest,
)
from spark_jobs.output import (
    DEFAULT_FILE_ROWS,
    DEFAULT_ROW_GROUP_ROWS,
    PARTITION_COLUMN,
    add_layout_arguments,
    commit,
    date_folders,
    discard,
    footer_rows_per_date,
    link_date_folders,
    new_staging_folder,
    partition_date,
    recover_and_clean,
    write_partitioned,
)
from valuerank.config import ConfigError, PipelineConfig, load_config, parse_utc

logger = logging.getLogger(__name__)

IMPRESSION_DROP_REASONS = (
    "null_impression_id",
    "null_user_id",
    "null_item_id",
    "null_timestamp",
    "duplicate_impression_id",
)
"""Drop reasons of impressions. Of the rows sharing an impression id, the earliest is kept."""

EVENT_DROP_REASONS = (
    "null_action",
    "null_timestamp",
    "null_user_id",
    "null_item_id",
    "unknown_action",
    "duplicate",
    "unknown_impression_id",
    "impression_dropped",
    "before_impression",
    "outside_window",
    "no_impression",
)
"""Drop reasons of events. A NULL user or item id only matters for an event without an impression id.
``impression_dropped`` means that the event's impression id belongs only to dropped impressions.
``before_impression`` means that the event precedes its impression, or every impression of its
user and item. ``no_impression`` means that its user was never shown its item."""

LABELLED = "labelled"
HELD_BACK = "open_window"
ATTRIBUTED = "attributed"
ATTRIBUTED_TO_HELD_BACK = "attributed_to_held_back"

OUTCOME = "_vr_outcome"
"""Internal column: the outcome of each impression or event row."""

TIME_US = "_vr_time_us"
"""Internal column: the row's timestamp in microseconds since the epoch."""

ATTRIBUTED_IMPRESSION_ID = "attributed_impression_id"
"""Column of ``attribute_events``: the impression an event was attributed to, else NULL."""

_KIND = "_vr_kind"
_MATCH = "_vr_match"
_PAIR_SHOWN = "_vr_pair_shown"
_SORT_ID = "_vr_sort_id"
_TARGET_TIME = "_vr_target_time_us"
_TARGET_HELD = "_vr_target_held"
_FOUND = "_vr_found"
_RANK = "_vr_rank"
INTERNAL_COLUMNS = (OUTCOME, TIME_US, ATTRIBUTED_IMPRESSION_ID, _KIND, _MATCH, _PAIR_SHOWN, _SORT_ID,
                    _TARGET_TIME, _TARGET_HELD, _FOUND, _RANK)

_IMPRESSION_KEYS = ("impression_id", "user_id", "item_id", "timestamp")
_EVENT_COLUMNS = ("user_id", "item_id", "action", "timestamp", "impression_id")


# --- input columns -----------------------------------------------------------


def impression_specs(cfg: PipelineConfig) -> list[ColumnSpec]:
    """Return the impression columns that the job reads, named as in ``cfg.columns.impressions``."""
    names = cfg.columns.impressions
    specs = [
        ColumnSpec(names.impression_id, "impression_id", "id"),
        ColumnSpec(names.user_id, "user_id", "id"),
        ColumnSpec(names.item_id, "item_id", "id"),
        ColumnSpec(names.timestamp, "timestamp", "timestamp"),
    ]
    if names.request_id is not None:
        specs.append(ColumnSpec(names.request_id, "request_id", "id", required=False))
    if names.position is not None:
        specs.append(ColumnSpec(names.position, "position", "id", required=False))
    return specs


def event_specs(cfg: PipelineConfig) -> list[ColumnSpec]:
    """Return the event columns that the job reads, named as in ``cfg.columns.events``."""
    names = cfg.columns.events
    specs = [
        ColumnSpec(names.user_id, "user_id", "id"),
        ColumnSpec(names.item_id, "item_id", "id"),
        ColumnSpec(names.action, "action", "string"),
        ColumnSpec(names.timestamp, "timestamp", "timestamp"),
    ]
    if names.impression_id is not None:
        specs.append(ColumnSpec(names.impression_id, "impression_id", "id", required=False))
    return specs


def _window_us(cfg: PipelineConfig) -> Column:
    """Return the attribution window in microseconds of the row's action (NULL for other actions)."""
    expression = None
    for action in cfg.actions:
        window = F.lit(action.window_seconds * 1_000_000)
        condition = F.col("action") == action.name
        expression = F.when(condition, window) if expression is None else expression.when(condition, window)
    return expression


def _max_window_us(cfg: PipelineConfig) -> int:
    return max(action.window_seconds for action in cfg.actions) * 1_000_000


# --- impressions -------------------------------------------------------------


def mark_impressions(impressions: DataFrame, cfg: PipelineConfig, as_of_us: int | None) -> DataFrame:
    """Add ``OUTCOME`` (``labelled``, ``open_window`` or a drop reason) and ``TIME_US`` to impressions.

    ``impressions`` has the canonical columns of ``read_parquet_input``. Of several rows
    with one impression id, the earliest is kept. Ties go to the smaller user id, item id
    and then the other columns of simple types, so the choice does not depend on
    partitioning. With ``as_of_us`` None, nothing is held back.
    """
    marked = impressions.withColumn(TIME_US, F.unix_micros("timestamp"))

    null_reason = None
    for column in _IMPRESSION_KEYS:
        condition = F.col(column).isNull()
        reason = F.lit(f"null_{column}")
        null_reason = F.when(condition, reason) if null_reason is None else null_reason.when(condition, reason)
    marked = marked.withColumn(OUTCOME, null_reason)

    # Rank the valid rows of each impression id. Only the first one is kept. Rows with a
    # NULL key skip the window, so that many of them cannot pile up in one task.
    invalid = marked.filter(F.col(OUTCOME).isNotNull())
    marked = marked.filter(F.col(OUTCOME).isNull())
    tie_breakers = [
        quoted(f.name)
        for f in impressions.schema.fields
        if f.name not in _IMPRESSION_KEYS and isinstance(f.dataType, AtomicType) and not isinstance(f.dataType, VariantType)
    ]
    by_id = Window.partitionBy("impression_id").orderBy(TIME_US, "user_id", "item_id", *tie_breakers)
    marked = marked.withColumn(_RANK, F.row_number().over(by_id))
    marked = marked.withColumn(
        OUTCOME,
        F.when(F.col(_RANK) > 1, F.lit("duplicate_impression_id")).otherwise(F.lit(LABELLED)),
    ).drop(_RANK)
    marked = marked.unionByName(invalid)

    if as_of_us is None:
        return marked
    window_open = F.col(TIME_US) + F.lit(_max_window_us(cfg)) > F.lit(as_of_us)
    return marked.withColumn(
        OUTCOME,
        F.when((F.col(OUTCOME) == LABELLED) & window_open, F.lit(HELD_BACK)).otherwise(F.col(OUTCOME)),
    )


def _kept_impressions(marked_impressions: DataFrame) -> DataFrame:
    return marked_impressions.filter(F.col(OUTCOME).isin(LABELLED, HELD_BACK))


# --- events ------------------------------------------------------------------


def mark_invalid_events(events: DataFrame, cfg: PipelineConfig) -> DataFrame:
    """Add ``OUTCOME``: the drop reason of an event that cannot be attributed at all, else NULL.

    The checks run in ``EVENT_DROP_REASONS`` order up to ``duplicate``. Of the copies of
    an event, one stays valid and the others get ``duplicate``. The copies are identical
    in every column that the job uses, so it does not matter which one stays.
    """
    without_impression = F.col("impression_id").isNull()
    marked = events.withColumn(TIME_US, F.unix_micros("timestamp")).withColumn(
        OUTCOME,
        F.when(F.col("action").isNull(), F.lit("null_action"))
        .when(F.col("timestamp").isNull(), F.lit("null_timestamp"))
        .when(without_impression & F.col("user_id").isNull(), F.lit("null_user_id"))
        .when(without_impression & F.col("item_id").isNull(), F.lit("null_item_id"))
        .when(~F.col("action").isin(*[a.name for a in cfg.actions]), F.lit("unknown_action")),
    )

    # Only valid events are ranked, so that rows with NULL keys cannot pile up in one task.
    invalid = marked.filter(F.col(OUTCOME).isNotNull())
    valid = marked.filter(F.col(OUTCOME).isNull())
    copies = Window.partitionBy("user_id", "item_id", "action", TIME_US, "impression_id").orderBy(TIME_US)
    valid = valid.withColumn(_RANK, F.row_number().over(copies))
    valid = valid.withColumn(
        OUTCOME, F.when(F.col(_RANK) > 1, F.lit("duplicate")).otherwise(F.col(OUTCOME))
    ).drop(_RANK)
    return valid.unionByName(invalid)


def _attributed_outcome(held: Column) -> Column:
    return F.when(held, F.lit(ATTRIBUTED_TO_HELD_BACK)).otherwise(F.lit(ATTRIBUTED))


def _attribute_by_impression_id(events: DataFrame, marked_impressions: DataFrame, cfg: PipelineConfig) -> DataFrame:
    """Attribute events that carry an impression id, by a join on that id."""
    lookup = (
        marked_impressions.filter(F.col("impression_id").isNotNull())
        .groupBy("impression_id")
        .agg(
            F.max(F.when(F.col(OUTCOME).isin(LABELLED, HELD_BACK), F.col(TIME_US))).alias(_TARGET_TIME),
            F.max(F.when(F.col(OUTCOME).isin(LABELLED, HELD_BACK), F.col(OUTCOME) == HELD_BACK)).alias(_TARGET_HELD),
        )
        .withColumn(_FOUND, F.lit(True))
    )
    joined = events.join(lookup, on="impression_id", how="left")

    target_time = F.col(_TARGET_TIME)
    outcome = (
        F.when(F.col(_FOUND).isNull(), F.lit("unknown_impression_id"))
        .when(target_time.isNull(), F.lit("impression_dropped"))
        .when(F.col(TIME_US) < target_time, F.lit("before_impression"))
        .when(F.col(TIME_US) > target_time + _window_us(cfg), F.lit("outside_window"))
        .otherwise(_attributed_outcome(F.col(_TARGET_HELD)))
    )
    return joined.withColumn(OUTCOME, outcome).withColumn(
        ATTRIBUTED_IMPRESSION_ID,
        F.when(F.col(OUTCOME).isin(ATTRIBUTED, ATTRIBUTED_TO_HELD_BACK), F.col("impression_id")),
    )


def _attribute_by_user_item(events: DataFrame, marked_impressions: DataFrame, cfg: PipelineConfig) -> DataFrame:
    """Attribute events without an impression id to the latest earlier impression of their user and item.

    Impressions and events are unioned and sorted per (user, item) by time, impressions
    before events at equal times and by ascending id among themselves, so a running
    ``last(..., ignorenulls)`` yields the latest earlier impression with the larger id
    on ties. This costs one shuffle and a sort, where a range join could multiply rows.
    """
    impressions = _kept_impressions(marked_impressions).select(
        "user_id",
        "item_id",
        TIME_US,
        F.lit(0).alias(_KIND),
        F.col("impression_id").alias(_SORT_ID),
        F.struct(
            F.col("impression_id").alias("impression_id"),
            F.col(TIME_US).alias("time_us"),
            (F.col(OUTCOME) == HELD_BACK).alias("held"),
        ).alias(_MATCH),
    )
    tagged_events = events.withColumn(_KIND, F.lit(1))
    rows = tagged_events.unionByName(impressions, allowMissingColumns=True)

    running = (
        Window.partitionBy("user_id", "item_id")
        .orderBy(TIME_US, _KIND, _SORT_ID)
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    whole_pair = Window.partitionBy("user_id", "item_id")
    rows = rows.withColumn(_MATCH, F.last(_MATCH, ignorenulls=True).over(running)).withColumn(
        _PAIR_SHOWN, F.max(F.col(_KIND) == 0).over(whole_pair)
    )
    matched = rows.filter(F.col(_KIND) == 1)

    match = F.col(_MATCH)
    outcome = (
        F.when(match.isNull() & ~F.col(_PAIR_SHOWN), F.lit("no_impression"))
        .when(match.isNull(), F.lit("before_impression"))
        .when(F.col(TIME_US) > match["time_us"] + _window_us(cfg), F.lit("outside_window"))
        .otherwise(_attributed_outcome(match["held"]))
    )
    return matched.withColumn(OUTCOME, outcome).withColumn(
        ATTRIBUTED_IMPRESSION_ID,
        F.when(F.col(OUTCOME).isin(ATTRIBUTED, ATTRIBUTED_TO_HELD_BACK), match["impression_id"]),
    )


def attribute_events(marked_impressions: DataFrame, events: DataFrame, cfg: PipelineConfig) -> DataFrame:
    """Attribute events to impressions and return one row per event with its outcome.

    ``marked_impressions`` is the output of ``mark_impressions``. ``events`` has the
    canonical event columns, and its ``impression_id`` may be NULL everywhere. The result
    has the event columns, ``OUTCOME`` (``attributed``, ``attributed_to_held_back`` or a
    drop reason) and ``ATTRIBUTED_IMPRESSION_ID``.
    """
    marked = mark_invalid_events(events.select(*_EVENT_COLUMNS), cfg)
    valid = F.col(OUTCOME).isNull()

    rejected = marked.filter(~valid).withColumn(ATTRIBUTED_IMPRESSION_ID, F.lit(None).cast("bigint"))
    with_id = _attribute_by_impression_id(
        marked.filter(valid & F.col("impression_id").isNotNull()).drop(OUTCOME), marked_impressions, cfg
    )
    without_id = _attribute_by_user_item(
        marked.filter(valid & F.col("impression_id").isNull()).drop(OUTCOME), marked_impressions, cfg
    )

    columns = [*_EVENT_COLUMNS, TIME_US, OUTCOME, ATTRIBUTED_IMPRESSION_ID]
    parts = [frame.select(*columns) for frame in (rejected, with_id, without_id)]
    return reduce(DataFrame.unionByName, parts)


# --- labels ------------------------------------------------------------------


def label_impressions(marked_impressions: DataFrame, attributed_events: DataFrame, cfg: PipelineConfig) -> DataFrame:
    """Join the attributed events onto the impressions with outcome ``labelled`` as label columns.

    The result has the output layout: the impression columns, then one int8 label per
    action in config order. A label is 1 when at least one event of its action was
    attributed to the impression.
    """
    positives = (
        attributed_events.filter(F.col(OUTCOME) == ATTRIBUTED)
        .groupBy(F.col(ATTRIBUTED_IMPRESSION_ID).alias("impression_id"))
        .agg(*[F.max((F.col("action") == a.name).cast("int")).alias(a.label_column) for a in cfg.actions])
    )
    labelled = marked_impressions.filter(F.col(OUTCOME) == LABELLED).join(positives, on="impression_id", how="left")

    impression_columns = [name for name in marked_impressions.columns if name not in INTERNAL_COLUMNS]
    labels = [F.coalesce(F.col(a.label_column), F.lit(0)).cast("tinyint").alias(a.label_column) for a in cfg.actions]
    return labelled.select(*[quoted(name) for name in impression_columns], *labels)


def resolve_as_of(impressions: DataFrame, events: DataFrame, as_of: datetime | None) -> tuple[int | None, str]:
    """Return ``as_of`` in microseconds and its source.

    Without an explicit time, the latest event timestamp is used, including events that
    are dropped later. Without events, the latest impression timestamp is used, and
    without either, None.
    """
    if as_of is not None:
        return datetime_to_micros(as_of), "argument"
    latest_event = events.agg(F.max(F.unix_micros("timestamp"))).first()[0]
    if latest_event is not None:
        return latest_event, "max_event_timestamp"
    latest_impression = impressions.agg(F.max(F.unix_micros("timestamp"))).first()[0]
    if latest_impression is not None:
        return latest_impression, "max_impression_timestamp"
    return None, "no_timestamps"


# --- job ---------------------------------------------------------------------


def count_event_actions(events: DataFrame) -> dict[str, int]:
    """Return the number of events per action name in the event log (NULL names skipped)."""
    rows = events.filter(F.col("action").isNotNull()).groupBy("action").count().collect()
    return {row["action"]: row["count"] for row in rows}


def check_config_actions(cfg: PipelineConfig, event_actions: dict[str, int], events_path: str) -> None:
    """Raise ConfigError for a configured action that never occurs in the event log.

    A misspelt action would otherwise label every impression negative for it without
    any error.
    """
    for i, action in enumerate(cfg.actions):
        if action.name in event_actions:
            continue
        present = ", ".join(sorted(event_actions)) or "none"
        raise ConfigError(
            f"actions[{i}].name: action {action.name!r} does not occur in the event log {events_path} "
            f"(actions present: {present}); fix the name, remove the action, or pass "
            "--allow-absent-actions if it is rare and absent in this period"
        )


def run_label_join(
    spark: SparkSession,
    cfg: PipelineConfig,
    impressions_path: str,
    events_path: str,
    out_path: str,
    as_of: datetime | str | None = None,
    allow_absent_actions: bool = False,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    file_rows: int = DEFAULT_FILE_ROWS,
) -> dict:
    """Label the impressions, write them to ``out_path`` with a manifest, and return the manifest.

    The output is partitioned by the UTC date of the impression (``dt=YYYY-MM-DD``). Every
    date that has an impression in this run's input is replaced, dates of an earlier run
    outside them are kept, and the swap is atomic (``spark_jobs.output``).

    The output path and every input file's schema are checked before Spark reads any
    data. The manifest's row counts are checked to add up, and ``rows_out`` and
    ``positives`` are counted in the written files. Raise OutputPathError for an unsafe
    output path, InputSchemaError for a bad input, ConfigError for a feature column
    that the impressions lack, EmptyOutputError when no impression is labelled (before
    writing), and AccountingError when the counts do not add up.
    """
    require_utc_session(spark)
    if isinstance(as_of, str):
        as_of = parse_utc(as_of, "--as-of")
    unit = cfg.columns.timestamp_unit
    reserved = (*cfg.label_columns, *INTERNAL_COLUMNS)
    out = check_output_path("label_join", out_path, {"impressions": impressions_path, "events": events_path})

    # Check every file of both inputs and the feature columns before any Spark work.
    impression_input = inspect_parquet_input(
        "impressions", impressions_path, impression_specs(cfg), "columns.impressions", unit, reserved
    )
    check_impressions_usable(impression_input, cfg)
    event_input = inspect_parquet_input("events", events_path, event_specs(cfg), "columns.events", unit)

    impressions = read_parquet_input(spark, impression_input, unit, keep_other_columns=True)
    events = read_parquet_input(spark, event_input, unit, keep_other_columns=False)
    if "impression_id" not in events.columns:
        events = events.withColumn("impression_id", F.lit(None).cast("bigint"))

    event_actions = count_event_actions(events)
    if not allow_absent_actions:
        check_config_actions(cfg, event_actions, events_path)

    as_of_us, as_of_source = resolve_as_of(impressions, events, as_of)
    logger.info("as_of %s (%s)", iso_utc(as_of_us), as_of_source)

    # Persist both outcome tables, because each feeds the output and the manifest counts.
    # The plan is deterministic (no random numbers, ties broken by value), so a recomputed
    # cache block yields the same rows, and the read-back check below catches any change.
    marked = mark_impressions(impressions, cfg, as_of_us).persist(StorageLevel.MEMORY_AND_DISK)
    attributed = attribute_events(marked, events, cfg).persist(StorageLevel.MEMORY_AND_DISK)
    stage = None
    try:
        impression_outcomes, event_outcomes, outcomes_by_date = count_outcomes(marked, attributed)
        if impression_outcomes.get(LABELLED, 0) == 0:
            raise EmptyOutputError(describe_no_labelled(marked, impression_outcomes, as_of_us, as_of_source, cfg))
        labelled = with_partition_date(label_impressions(marked, attributed, cfg))
        planned = {date: counts.get(LABELLED, 0) for date, counts in outcomes_by_date.items()}

        # Build the new output in a staging folder, then count what was written there.
        recover_and_clean(out)
        stage = new_staging_folder(out)
        logger.info("writing the new output to the staging folder %s", stage)
        write_partitioned(spark, labelled, stage, planned, row_group_rows, file_rows)
    except BaseException:
        if stage is not None:
            discard(stage)
        raise
    finally:
        attributed.unpersist()
        marked.unpersist()

    try:
        written = read_back(spark, stage, cfg)
        for date in sorted(set(planned) | set(written)):
            check_balance(
                f"labelled impressions of {date}",
                planned.get(date, 0),
                {"rows_written": written.get(date, {}).get("rows", 0)},
            )
        rows_out = sum(part["rows"] for part in written.values())
        positives = {a.name: sum(part["positives"][a.name] for part in written.values()) for a in cfg.actions}

        # Dates of this run's impressions are replaced, and earlier dates outside them are kept.
        kept_dates = sorted(set(date_folders(out)) - set(outcomes_by_date)) if out.is_dir() else []
        link_date_folders(out, stage, kept_dates)

        manifest = {
            "job": "label_join",
            "as_of": iso_utc(as_of_us),
            "as_of_source": as_of_source,
            "attribution_windows_s": {a.name: a.window_seconds for a in cfg.actions},
            "impressions": {
                "rows_in": impression_input.rows,
                "rows_out": rows_out,
                "dropped": {reason: impression_outcomes.get(reason, 0) for reason in IMPRESSION_DROP_REASONS},
                "held_back": {HELD_BACK: impression_outcomes.get(HELD_BACK, 0)},
            },
            "events": {
                "rows_in": event_input.rows,
                "attributed": event_outcomes.get(ATTRIBUTED, 0),
                "attributed_to_held_back": event_outcomes.get(ATTRIBUTED_TO_HELD_BACK, 0),
                "dropped": {reason: event_outcomes.get(reason, 0) for reason in EVENT_DROP_REASONS},
            },
            "positives": positives,
            "label_columns": cfg.label_columns,
            "partitions": {
                date: {
                    "impressions_in": sum(outcomes_by_date[date].values()),
                    "rows_out": written.get(date, {}).get("rows", 0),
                    "held_back": outcomes_by_date[date].get(HELD_BACK, 0),
                    "dropped": sum(outcomes_by_date[date].get(reason, 0) for reason in IMPRESSION_DROP_REASONS),
                }
                for date in sorted(outcomes_by_date)
            },
            "partitions_kept_from_earlier_runs": {date: rows for date, rows in footer_rows_per_date(stage).items() if date in kept_dates},
            "row_group_rows": row_group_rows,
            "file_rows": file_rows,
            "missing_optional_columns": {"impressions": impression_input.absent, "events": event_input.absent},
            "inputs": {"impressions": str(impression_input.path), "events": str(event_input.path)},
            "output": str(out_path),
        }
        check_label_join_accounting(manifest, impression_outcomes.get(LABELLED, 0))
        write_manifest(stage, manifest)
        logger.info("committing %s", out)
        commit(stage, out)
    except BaseException:
        discard(stage)
        raise
    return manifest


def check_impressions_usable(impression_input: ParquetInput, cfg: PipelineConfig) -> None:
    """Raise InputSchemaError for an impressions input without rows, and ConfigError for a missing feature column.

    Both checks use the Parquet footers only. Feature columns are looked up under the
    names that the output has, so a renamed key column is found as e.g. ``item_id``.
    """
    if impression_input.rows == 0:
        raise InputSchemaError(
            f"impressions input {impression_input.path} contains no rows in its {len(impression_input.files)} "
            "Parquet files; pass the impression log of the period to label"
        )
    check_feature_columns(
        cfg, impression_input.canonical_columns(), f"the impressions input {impression_input.path}"
    )


def describe_no_labelled(
    marked_impressions: DataFrame,
    impression_outcomes: dict[str, int],
    as_of_us: int | None,
    as_of_source: str,
    cfg: PipelineConfig,
) -> str:
    """Return the error message for a run that labels no impression, with the counts and the likely fixes."""
    span = marked_impressions.agg(F.min(TIME_US).alias("first"), F.max(TIME_US).alias("last")).first()
    held_back = impression_outcomes.get(HELD_BACK, 0)
    drops = {reason: impression_outcomes.get(reason, 0) for reason in IMPRESSION_DROP_REASONS}
    dropped = sum(drops.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in drops.items() if count)
    if reasons:
        reasons = f" ({reasons})"
    max_window_s = _max_window_us(cfg) // 1_000_000

    counts = (
        f"as_of {iso_utc(as_of_us)} ({as_of_source}), impressions span {iso_utc(span['first'])} to "
        f"{iso_utc(span['last'])}, {held_back} held back because the longest attribution window "
        f"({max_window_s} s) was still open at as_of, {dropped} dropped{reasons}"
    )
    hints = (
        f"Check columns.timestamp_unit ({cfg.columns.timestamp_unit!r}): for example, epoch seconds read with "
        "unit 'ms' put as_of in 1970. Otherwise pass --as-of with the time up to which the event log is "
        "complete, or pass a longer period of impressions"
    )
    return f"no impression was labelled: {counts}. {hints}"


def count_outcomes(
    marked_impressions: DataFrame, attributed_events: DataFrame
) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, int]]]:
    """Return the rows per outcome of impressions and of events, and per date and outcome of impressions.

    One Spark job counts all three. Impressions with a NULL timestamp have no date and
    appear only in the first result.
    """
    outcomes = marked_impressions.select(
        F.lit("impressions").alias("table"), OUTCOME, partition_date(F.col("timestamp")).alias(PARTITION_COLUMN)
    ).unionByName(
        attributed_events.select(F.lit("events").alias("table"), OUTCOME, F.lit(None).cast("string").alias(PARTITION_COLUMN))
    )
    counts: dict[str, dict[str, int]] = {"impressions": {}, "events": {}}
    by_date: dict[str, dict[str, int]] = {}
    for row in outcomes.groupBy("table", OUTCOME, PARTITION_COLUMN).count().collect():
        table_counts = counts[row["table"]]
        table_counts[row[OUTCOME]] = table_counts.get(row[OUTCOME], 0) + row["count"]
        if row["table"] == "impressions" and row[PARTITION_COLUMN] is not None:
            by_date.setdefault(row[PARTITION_COLUMN], {})[row[OUTCOME]] = row["count"]
    return counts["impressions"], counts["events"], by_date


def with_partition_date(labelled: DataFrame) -> DataFrame:
    """Add the ``dt`` partition column (UTC date of ``timestamp``), replacing an input column of that name."""
    if PARTITION_COLUMN in labelled.columns:
        logger.warning(
            "the impressions have a column %r; the output replaces it with the UTC date of the timestamp, "
            "which names the output partitions", PARTITION_COLUMN,
        )
    return labelled.withColumn(PARTITION_COLUMN, partition_date(F.col("timestamp")))


def read_back(spark: SparkSession, path: Path, cfg: PipelineConfig) -> dict[str, dict]:
    """Return {date: {"rows": n, "positives": {action: n}}} counted in the files written under ``path``."""
    frame = spark.read.parquet(str(path))
    rows = frame.groupBy(F.col(PARTITION_COLUMN).cast("string").alias(PARTITION_COLUMN)).agg(
        F.count(F.lit(1)).alias("_rows"),
        *[F.sum(a.label_column).alias(a.name) for a in cfg.actions],
    ).collect()
    return {
        row[PARTITION_COLUMN]: {"rows": row["_rows"], "positives": {a.name: int(row[a.name] or 0) for a in cfg.actions}}
        for row in rows
    }


def check_label_join_accounting(manifest: dict, labelled_rows: int) -> None:
    """Raise AccountingError unless every input row of the manifest has exactly one outcome.

    ``labelled_rows`` is the number of impressions marked ``labelled`` before the write,
    which must equal the rows counted in the written files.
    """
    impressions = manifest["impressions"]
    check_balance(
        "impressions",
        impressions["rows_in"],
        {"rows_out": impressions["rows_out"], **impressions["dropped"], **impressions["held_back"]},
    )
    check_balance("labelled impressions written", labelled_rows, {"rows_out": impressions["rows_out"]})

    events = manifest["events"]
    check_balance(
        "events",
        events["rows_in"],
        {
            ATTRIBUTED: events["attributed"],
            ATTRIBUTED_TO_HELD_BACK: events["attributed_to_held_back"],
            **events["dropped"],
        },
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line of the label join."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline config file (TOML)")
    parser.add_argument("--impressions", required=True, help="impression log: a Parquet file or folder")
    parser.add_argument("--events", required=True, help="action event log: a Parquet file or folder")
    parser.add_argument("--out", required=True, help="output folder for the labelled Parquet and _manifest.json")
    parser.add_argument(
        "--as-of",
        default=None,
        help="UTC time (ISO 8601) up to which the event log is complete (default: the latest event time)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. split.eval_days=2 (repeatable)",
    )
    parser.add_argument(
        "--allow-absent-actions",
        action="store_true",
        help="label a configured action that never occurs in the event log as 0 instead of failing",
    )
    parser.add_argument(
        "--master", default=None, help="Spark master if no session is active (default: the one spark-submit sets)"
    )
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def _main(argv: list[str] | None = None) -> int:
    """Run the label join from the command line and return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    as_of = None if args.as_of is None else parse_utc(args.as_of, "--as-of")

    spark, created_here = get_or_create_session("valuerank-label-join", master=args.master)
    try:
        manifest = run_label_join(
            spark, cfg, args.impressions, args.events, args.out, as_of=as_of,
            allow_absent_actions=args.allow_absent_actions,
            row_group_rows=args.row_group_rows, file_rows=args.file_rows,
        )
    finally:
        if created_here:
            spark.stop()

    impressions = manifest["impressions"]
    logger.info(
        "label join done: %d of %d impressions labelled, %d held back, %d dropped, positives %s, output %s",
        impressions["rows_out"],
        impressions["rows_in"],
        sum(impressions["held_back"].values()),
        sum(impressions["dropped"].values()),
        manifest["positives"],
        args.out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the job from the command line; report bad input in one line and return 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
