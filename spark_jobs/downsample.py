"""Split labelled impressions by time and downsample the training split per stratum.

Run from the repository root with the virtual environment active (``make venv`` creates it and
installs the package), so that spark-submit runs the job with that Python::

    spark-submit --master 'local[*]' spark_jobs/downsample.py --config configs/demo.toml --labelled PATH --out PATH

On a cluster, pass its master and any ``--conf`` pairs to spark-submit (the job keeps them); the
paths must be mounted at the same place on the driver and every executor::

    spark-submit --master yarn --deploy-mode cluster --conf spark.executor.instances=8 \\
        --conf spark.pyspark.python=./venv/bin/python --archives venv.tar.gz#venv --files pipeline.toml \\
        spark_jobs/downsample.py --config pipeline.toml --labelled /mnt/runs/r1/labelled \\
        --out /mnt/runs/r1/downsampled

    spark-submit --master k8s://https://KUBERNETES_API:6443 --deploy-mode cluster \\
        --conf spark.kubernetes.container.image=valuerank:0.1.0-cpu \\
        --conf spark.kubernetes.authenticate.driver.serviceAccountName=valuerank-spark \\
        local:///opt/valuerank/spark_jobs/downsample.py --config /data/pipeline.toml \\
        --labelled /data/runs/k8s/labelled --out /data/runs/k8s/downsampled

docs/clusters.md gives the volume settings of the Kubernetes command, and k8s/ the same job as a
SparkApplication for the Spark operator.

The input is the output of ``spark_jobs/label_join.py``. Rows at or after the eval start
(``split.eval_start``, or the newest timestamp minus ``split.eval_days``) form the eval
split, which is written in full to ``<out>/eval``. The rest is the training split, which
is downsampled per stratum and written to ``<out>/train``.

A stratum is the label pattern of a row ("negative", or the positive actions joined by
"+" in config order), prefixed by ``"<value>/"`` when ``downsampling.stratum_column`` is
set. A row is kept when a uniform number derived from a hash of the seed and its
impression id is below its stratum's keep rate, so the same rows are kept for any
partitioning and on every rerun. Each row gets ``weight = 1 / keep_rate``.

The keep rate of a training stratum comes from the first rule that applies:

1. ``downsampling.keep_rates`` under the full stratum name, then under the bare label
   pattern (e.g. ``negative``).
2. 1.0 for a stratum with a positive label, when ``downsampling.keep_positives`` is on.
   With it off, a positive stratum must have an explicit rate: the job raises ConfigError
   naming the stratum otherwise.
3. For the negative stratum, when ``downsampling.target_negative_ratio`` r is set:
   min(1, r * positives / negatives). Positives are the rows with at least one positive
   label, and negatives are the rows without. Both are counted in the training split,
   within one stratum column value (or over all rows without a stratum column).
4. 1.0.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, IntegralType, TimestampNTZType, TimestampType

from spark_jobs.common import (
    EmptyOutputError,
    InputSchemaError,
    check_balance,
    check_feature_columns,
    check_output_path,
    count_by,
    datetime_to_micros,
    get_or_create_session,
    iso_utc,
    local_path,
    quoted,
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
    discard,
    new_staging_folder,
    partition_date,
    recover_and_clean,
    write_partitioned,
)
from valuerank.config import ConfigError, PipelineConfig, load_config

logger = logging.getLogger(__name__)

NEGATIVE = "negative"
"""Label pattern of a row without any positive label."""

NULL_VALUE = "__null__"
"""Stratum prefix for rows whose stratum column is NULL."""

ALL_VALUES = "__all__"
"""Group name in ``action_keep_rates`` when there is no stratum column."""

OUTPUT_COLUMNS = ("stratum", "keep_rate", "weight")
"""Columns that the job adds, so the input must not have them already."""

_IS_EVAL = "_vr_is_eval"
_KEPT = "_vr_kept"
_MICROS_PER_DAY = 86_400 * 1_000_000
_UNIFORM_BITS = 53


@dataclass(frozen=True)
class KeepRate:
    """Keep rate of one training stratum and the rule that set it."""

    rate: float
    """Fraction of the stratum's rows to keep, in (0, 1]."""

    rule: str
    """``keep_rates``, ``keep_positives``, ``target_negative_ratio`` or ``default``."""


# --- config and input checks -------------------------------------------------


def check_keep_rate_keys(cfg: PipelineConfig) -> None:
    """Raise ConfigError for a ``downsampling.keep_rates`` key that can never name a stratum.

    A key is a label pattern, or ``"<value>/<pattern>"`` when a stratum column is set.
    Stratum values depend on the data, so only the pattern part is checked.
    """
    down = cfg.downsampling
    for key in down.keep_rates:
        where = f"downsampling.keep_rates.{key}"
        pattern = key
        if "/" in key:
            if down.stratum_column is None:
                raise ConfigError(
                    f"{where}: a key of the form '<value>/<pattern>' needs downsampling.stratum_column; "
                    "set the stratum column or use the bare label pattern, e.g. 'negative'"
                )
            pattern = key.rsplit("/", 1)[1]
        if not _is_label_pattern(pattern, cfg):
            example = "+".join(a.name for a in cfg.actions[:2])
            raise ConfigError(
                f"{where}: {pattern!r} is not a label pattern; use 'negative' or action names joined by '+' "
                f"in config order, e.g. {example!r}"
            )


def _is_label_pattern(pattern: str, cfg: PipelineConfig) -> bool:
    if pattern == NEGATIVE:
        return True
    order = {a.name: i for i, a in enumerate(cfg.actions)}
    parts = pattern.split("+")
    if any(part not in order for part in parts):
        return False
    positions = [order[part] for part in parts]
    return positions == sorted(set(positions))


def read_labelled(spark: SparkSession, path: str, cfg: PipelineConfig) -> DataFrame:
    """Read the label join output, checking the columns that this job needs.

    Raise InputSchemaError naming the path and column when a column is missing or has a
    wrong type, or when an output column of this job already exists.
    """
    require_utc_session(spark)
    if not local_path(path).exists():
        raise InputSchemaError(f"labelled input not found: {path}; run spark_jobs/label_join.py first")
    frame = spark.read.parquet(str(local_path(path)))
    # The dt partition column of the label join output is derived from the timestamp again.
    frame = frame.drop(PARTITION_COLUMN)
    fields = {f.name: f.dataType for f in frame.schema.fields}
    fix = "run spark_jobs/label_join.py with the same config to produce it"

    for name in ("impression_id", "timestamp", *cfg.label_columns):
        if name not in fields:
            raise InputSchemaError(f"{path}: missing column {name!r}; {fix}. Columns: {', '.join(frame.columns)}")
    for name in ("impression_id", *cfg.label_columns):
        if not isinstance(fields[name], (IntegralType, BooleanType)):
            raise InputSchemaError(f"{path}: column {name!r} has type {fields[name].simpleString()}, expected an integer; {fix}")
    if not isinstance(fields["timestamp"], (TimestampType, TimestampNTZType)):
        raise InputSchemaError(
            f"{path}: column 'timestamp' has type {fields['timestamp'].simpleString()}, expected a timestamp; {fix}"
        )

    stratum_column = cfg.downsampling.stratum_column
    if stratum_column is not None and stratum_column not in fields:
        raise InputSchemaError(
            f"{path}: missing stratum column {stratum_column!r} (downsampling.stratum_column); pass the column "
            f"through the label join or change downsampling.stratum_column. Columns: {', '.join(frame.columns)}"
        )
    for name in OUTPUT_COLUMNS:
        if name in fields:
            raise InputSchemaError(
                f"{path}: column {name!r} already exists, so this input looks downsampled already; "
                "pass the label join output instead"
            )

    return frame.withColumn("impression_id", F.col("impression_id").cast("bigint")).withColumn(
        "timestamp", F.col("timestamp").cast("timestamp")
    )


@dataclass(frozen=True)
class LabelledSummary:
    """Row count and time span of the labelled input."""

    rows: int
    """Rows in the labelled input."""

    min_time_us: int | None
    """Oldest timestamp in microseconds since the epoch, None without rows."""

    max_time_us: int | None
    """Newest timestamp in microseconds since the epoch, None without rows."""


def summarize_labelled(labelled: DataFrame, path: str, cfg: PipelineConfig) -> LabelledSummary:
    """Return the row count and the time span of the labelled input, in one Spark job.

    Raise InputSchemaError naming the column when a timestamp is NULL or a label is not
    0 or 1, because such rows would fall out of both splits or into no stratum, and
    when there are no rows at all.
    """
    bad_labels = [
        F.sum((~F.coalesce(F.col(c).cast("bigint").isin(0, 1), F.lit(False))).cast("int")).alias(c)
        for c in cfg.label_columns
    ]
    summary = labelled.agg(
        F.count(F.lit(1)).alias("_rows"),
        F.min(F.unix_micros("timestamp")).alias("_min_time_us"),
        F.max(F.unix_micros("timestamp")).alias("_max_time_us"),
        F.sum(F.col("timestamp").isNull().cast("int")).alias("_null_timestamps"),
        *bad_labels,
    ).first()

    if summary["_null_timestamps"]:
        raise InputSchemaError(
            f"{path}: {summary['_null_timestamps']} rows have a NULL timestamp; "
            "rerun spark_jobs/label_join.py, which drops such impressions"
        )
    for column in cfg.label_columns:
        if summary[column]:
            raise InputSchemaError(
                f"{path}: column {column!r} has {summary[column]} values that are not 0 or 1; "
                "rerun spark_jobs/label_join.py to rebuild the labels"
            )
    if summary["_rows"] == 0:
        raise InputSchemaError(
            f"{path}: the labelled input contains no rows; check impressions.rows_out in the label join's "
            "_manifest.json, and rerun the label join on a log with labelled impressions"
        )
    return LabelledSummary(summary["_rows"], summary["_min_time_us"], summary["_max_time_us"])


# --- split and strata --------------------------------------------------------


def resolve_eval_start(cfg: PipelineConfig, max_time_us: int | None) -> tuple[int | None, str]:
    """Return the eval start in microseconds and the config key it came from.

    With ``split.eval_days`` and no rows at all, the start is None and every split is empty.
    """
    start = cfg.split.eval_start_time
    if start is not None:
        return datetime_to_micros(start), "split.eval_start"
    if max_time_us is None:
        return None, "split.eval_days"
    return max_time_us - round(cfg.split.eval_days * _MICROS_PER_DAY), "split.eval_days"


def check_splits_not_empty(
    train_rows: int, eval_rows: int, eval_start_us: int | None, eval_start_source: str,
    summary: LabelledSummary, cfg: PipelineConfig,
) -> None:
    """Raise EmptyOutputError when the training or the eval split has no rows, naming the config key to change."""
    if train_rows and eval_rows:
        return

    empty = "eval" if eval_rows == 0 else "training"
    side = "at or after" if empty == "eval" else "before"
    if eval_start_source == "split.eval_days":
        fix = (
            f"lower split.eval_days (now {cfg.split.eval_days}) below the span of the data, "
            "or set split.eval_start instead"
        )
    else:
        fix = "change split.eval_start to a time inside that span"
    raise EmptyOutputError(
        f"the {empty} split is empty: no labelled row is {side} the eval start {iso_utc(eval_start_us)} "
        f"(from {eval_start_source}), and the labelled timestamps span {iso_utc(summary.min_time_us)} to "
        f"{iso_utc(summary.max_time_us)}; {fix}"
    )


def label_pattern(cfg: PipelineConfig) -> Column:
    """Return the label pattern of each row: "negative", or its positive actions joined by "+" in config order."""
    positives = [F.when(F.col(a.label_column).cast("int") == 1, F.lit(a.name)) for a in cfg.actions]
    joined = F.concat_ws("+", *positives)
    return F.when(joined == "", F.lit(NEGATIVE)).otherwise(joined)


def add_strata(labelled: DataFrame, cfg: PipelineConfig) -> DataFrame:
    """Add the ``stratum`` column: the label pattern, crossed with the stratum column when set."""
    pattern = label_pattern(cfg)
    column = cfg.downsampling.stratum_column
    if column is None:
        return labelled.withColumn("stratum", pattern)
    value = F.coalesce(quoted(column).cast("string"), F.lit(NULL_VALUE))
    return labelled.withColumn("stratum", F.concat(value, F.lit("/"), pattern))


def is_eval_row(eval_start_us: int | None) -> Column:
    """Return whether a row belongs to the eval split: its timestamp is at or after ``eval_start_us``."""
    if eval_start_us is None:
        return F.lit(False)
    return F.unix_micros("timestamp") >= F.lit(eval_start_us)


def split_by_time(labelled: DataFrame, eval_start_us: int | None) -> tuple[DataFrame, DataFrame]:
    """Return (train, eval) split at ``eval_start_us``. None puts every row in train."""
    is_eval = is_eval_row(eval_start_us)
    return labelled.filter(~is_eval), labelled.filter(is_eval)


def stratum_parts(stratum: str, cfg: PipelineConfig) -> tuple[str, str]:
    """Split a stratum name into (stratum column value or ``__all__``, label pattern)."""
    if cfg.downsampling.stratum_column is None:
        return ALL_VALUES, stratum
    value, pattern = stratum.rsplit("/", 1)
    return value, pattern


# --- keep rates --------------------------------------------------------------


def derive_keep_rates(stratum_rows: dict[str, int], cfg: PipelineConfig) -> dict[str, KeepRate]:
    """Return the keep rate of every training stratum in ``stratum_rows`` (rows per stratum).

    Raise ConfigError naming the stratum when a rate falls outside (0, 1], for example a
    target negative ratio in a group without positives, which would keep no negatives.
    """
    down = cfg.downsampling
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    for stratum, rows in stratum_rows.items():
        value, pattern = stratum_parts(stratum, cfg)
        counts = negatives if pattern == NEGATIVE else positives
        counts[value] = counts.get(value, 0) + rows

    rates = {}
    for stratum, rows in sorted(stratum_rows.items()):
        value, pattern = stratum_parts(stratum, cfg)
        if stratum in down.keep_rates:
            rate = KeepRate(down.keep_rates[stratum], "keep_rates")
        elif pattern in down.keep_rates:
            rate = KeepRate(down.keep_rates[pattern], "keep_rates")
        elif pattern != NEGATIVE and down.keep_positives:
            rate = KeepRate(1.0, "keep_positives")
        elif pattern != NEGATIVE:
            raise ConfigError(
                f"downsampling.keep_positives is false, but positive stratum {stratum!r} has no keep rate; "
                f"set downsampling.keep_rates.{pattern} (or the full stratum name) to a rate in (0, 1]"
            )
        elif pattern == NEGATIVE and down.target_negative_ratio is not None and rows > 0:
            target_negatives = down.target_negative_ratio * positives.get(value, 0)
            rate = KeepRate(min(1.0, target_negatives / negatives[value]), "target_negative_ratio")
        else:
            rate = KeepRate(1.0, "default")

        if not (math.isfinite(rate.rate) and 0 < rate.rate <= 1):
            raise ConfigError(
                f"downsampling: keep rate {rate.rate} for stratum {stratum!r} (from {rate.rule}) is outside (0, 1]; "
                f"the training split has {positives.get(value, 0)} positive rows for this stratum value. "
                f"Set downsampling.keep_rates.{stratum} to a rate in (0, 1]"
            )
        rates[stratum] = rate
    return rates


def keep_uniform(impression_id: Column, seed: int) -> Column:
    """Return a number in [0, 1) that depends only on the seed and the impression id.

    The top 53 bits of xxhash64(seed, id) are scaled to [0, 1), so the double is exact.
    """
    hashed = F.xxhash64(F.lit(seed).cast("bigint"), impression_id)
    return F.shiftrightunsigned(hashed, 64 - _UNIFORM_BITS).cast("double") / F.lit(float(2**_UNIFORM_BITS))


def decide_keep(train: DataFrame, keep_rates: dict[str, float], seed: int) -> DataFrame:
    """Add ``keep_rate``, ``weight`` (1 / keep_rate) and the internal keep flag to training rows.

    Every stratum of ``train`` must be in ``keep_rates``, because a row of another stratum
    gets a NULL keep rate and is dropped.
    """
    if keep_rates:
        entries = [item for stratum, rate in sorted(keep_rates.items()) for item in (F.lit(stratum), F.lit(float(rate)))]
        keep_rate = F.create_map(*entries)[F.col("stratum")]
    else:
        keep_rate = F.lit(None).cast("double")
    decided = train.withColumn("keep_rate", keep_rate)
    decided = decided.withColumn("weight", F.lit(1.0) / F.col("keep_rate"))
    kept = F.coalesce(keep_uniform(F.col("impression_id"), seed) < F.col("keep_rate"), F.lit(False))
    return decided.withColumn(_KEPT, kept)


def downsample(train: DataFrame, keep_rates: dict[str, float], seed: int) -> DataFrame:
    """Return the kept training rows with ``keep_rate`` and ``weight``."""
    return decide_keep(train, keep_rates, seed).filter(F.col(_KEPT)).drop(_KEPT)


def mark_eval(eval_rows: DataFrame) -> DataFrame:
    """Add ``keep_rate`` and ``weight`` 1.0 to eval rows, which are never downsampled."""
    return eval_rows.withColumn("keep_rate", F.lit(1.0)).withColumn("weight", F.lit(1.0))


def action_keep_rates(rows_before: dict[str, int], rows_after: dict[str, int], cfg: PipelineConfig) -> dict:
    """Return {action: {value or __all__: {"positive": r_pos, "negative": r_neg}}} for the training split.

    r_neg is the kept share of training rows with label 0 for the action, r_pos the same
    for label 1. A stratum's pattern fixes every label of its rows, so stratum counts
    suffice. A rate is None when the group has no such rows.
    """
    result = {}
    for action in cfg.actions:
        totals: dict[str, dict[str, list[int]]] = {}
        for stratum, before in rows_before.items():
            value, pattern = stratum_parts(stratum, cfg)
            side = "positive" if action.name in pattern.split("+") else "negative"
            group = totals.setdefault(value, {"positive": [0, 0], "negative": [0, 0]})
            group[side][0] += before
            group[side][1] += rows_after.get(stratum, 0)
        result[action.name] = {
            value: {side: (after / before if before else None) for side, (before, after) in sides.items()}
            for value, sides in sorted(totals.items())
        }
    return result


# --- job ---------------------------------------------------------------------


def run_downsample(
    spark: SparkSession,
    cfg: PipelineConfig,
    labelled_path: str,
    out_path: str,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    file_rows: int = DEFAULT_FILE_ROWS,
) -> dict:
    """Split and downsample the labelled data, write ``<out>/train``, ``<out>/eval`` and the manifest.

    Both splits are partitioned by the UTC date of the impression (``dt=YYYY-MM-DD``). A
    rerun replaces the whole output folder in one atomic swap, because the split and the
    keep rates of one run describe all of its dates together.

    Returns the manifest. Its output counts are read back from the written files and
    checked against the keep decisions, and a mismatch raises AccountingError. Every
    check below runs before the earlier output is touched:

    - OutputPathError for an unsafe output path
    - InputSchemaError for a bad input
    - ConfigError for a missing feature column
    - EmptyOutputError for an empty split
    """
    check_keep_rate_keys(cfg)
    out = check_output_path("downsample", out_path, {"labelled": labelled_path})
    down = cfg.downsampling
    labelled = read_labelled(spark, labelled_path, cfg)
    check_feature_columns(cfg, labelled.columns, f"the labelled input {labelled_path}")

    # Split by time and count the strata of both splits.
    summary = summarize_labelled(labelled, labelled_path, cfg)
    rows_in, max_time_us = summary.rows, summary.max_time_us
    eval_start_us, eval_start_source = resolve_eval_start(cfg, max_time_us)
    stratified = add_strata(labelled, cfg).withColumn(PARTITION_COLUMN, partition_date(F.col("timestamp")))
    train, eval_rows = split_by_time(stratified, eval_start_us)
    split_counts = count_by(stratified.withColumn(_IS_EVAL, is_eval_row(eval_start_us)), _IS_EVAL, "stratum", PARTITION_COLUMN)
    train_before = _sum_by(split_counts, lambda key: key[1], lambda key: not key[0])
    eval_before = _sum_by(split_counts, lambda key: key[1], lambda key: key[0])
    eval_dates = _sum_by(split_counts, lambda key: key[2], lambda key: key[0])
    check_splits_not_empty(
        sum(train_before.values()), sum(eval_before.values()), eval_start_us, eval_start_source, summary, cfg
    )

    # Decide the keep rates, then count the keep decisions before writing.
    keep_rates = derive_keep_rates(train_before, cfg)
    decided = decide_keep(train, {s: k.rate for s, k in keep_rates.items()}, down.seed)
    decisions = count_by(decided, "stratum", _KEPT, PARTITION_COLUMN)
    planned_kept = _sum_by(decisions, lambda key: key[0], lambda key: key[1])
    train_dates = _sum_by(decisions, lambda key: key[2], lambda key: key[1])
    dropped = sum(n for (_, kept, _), n in decisions.items() if not kept)
    if not planned_kept:
        rates = ", ".join(f"{stratum} {rate.rate}" for stratum, rate in sorted(keep_rates.items()))
        raise EmptyOutputError(
            f"downsampling keeps none of the {sum(train_before.values())} training rows (keep rates: {rates}); "
            "raise downsampling.keep_rates or downsampling.target_negative_ratio, or label a longer period"
        )

    # Every check passed. Build the whole new output in a staging folder. The earlier
    # output stays in place until the swap at the end.
    recover_and_clean(out)
    stage = new_staging_folder(out)
    try:
        logger.info("writing the new output to the staging folder %s", stage)
        train_out_frame = decided.filter(F.col(_KEPT)).drop(_KEPT)
        write_partitioned(spark, train_out_frame, stage / "train", train_dates, row_group_rows, file_rows)
        write_partitioned(spark, mark_eval(eval_rows), stage / "eval", eval_dates, row_group_rows, file_rows)

        # Count what was written, so the manifest describes the files.
        train_written = count_by(spark.read.schema(train_out_frame.schema).parquet(str(stage / "train")), "stratum", PARTITION_COLUMN)
        eval_frame = mark_eval(eval_rows)
        eval_written = count_by(spark.read.schema(eval_frame.schema).parquet(str(stage / "eval")), "stratum", PARTITION_COLUMN)
        train_after = _sum_by(train_written, lambda key: key[0])
        eval_after = _sum_by(eval_written, lambda key: key[0])

        train_in = sum(train_before.values())
        eval_in = sum(eval_before.values())
        train_out = sum(train_after.values())
        eval_out = sum(eval_after.values())
        check_balance("labelled rows", rows_in, {"train": train_in, "eval": eval_in})
        check_balance("training rows", train_in, {"rows_out": train_out, "downsampled": dropped})
        check_balance("eval rows", eval_in, {"rows_out": eval_out})
        for stratum in sorted(set(planned_kept) | set(train_after)):
            check_balance(
                f"training stratum {stratum!r} kept",
                planned_kept.get(stratum, 0),
                {"rows_written": train_after.get(stratum, 0)},
            )
        for split, planned, written in (
            ("training", train_dates, _sum_by(train_written, lambda key: key[1])),
            ("eval", eval_dates, _sum_by(eval_written, lambda key: key[1])),
        ):
            for date in sorted(set(planned) | set(written)):
                check_balance(f"{split} rows of {date}", planned.get(date, 0), {"rows_written": written.get(date, 0)})

        manifest = {
            "job": "downsample",
            "seed": down.seed,
            "stratum_column": down.stratum_column,
            "split": {
                "eval_start": iso_utc(eval_start_us),
                "eval_start_source": eval_start_source,
                "eval_days": cfg.split.eval_days,
                "max_timestamp": iso_utc(max_time_us),
                "train_rows": train_in,
                "eval_rows": eval_in,
            },
            "strata": {
                stratum: {
                    "rows_before": train_before[stratum],
                    "rows_after": train_after.get(stratum, 0),
                    "keep_rate": keep_rates[stratum].rate,
                    "rule": keep_rates[stratum].rule,
                }
                for stratum in sorted(train_before)
            },
            "action_keep_rates": action_keep_rates(train_before, train_after, cfg),
            "rows_in": rows_in,
            "train": {"rows_in": train_in, "rows_out": train_out, "dropped": {"downsampled": dropped}},
            "eval": {"rows_in": eval_in, "rows_out": eval_out, "strata": dict(sorted(eval_after.items()))},
            "partitions": {
                "train": dict(sorted(_sum_by(train_written, lambda key: key[1]).items())),
                "eval": dict(sorted(_sum_by(eval_written, lambda key: key[1]).items())),
            },
            "row_group_rows": row_group_rows,
            "file_rows": file_rows,
            "inputs": {"labelled": str(labelled_path)},
            "output": str(out_path),
        }
        write_manifest(stage, manifest)
        logger.info("committing %s", out)
        commit(stage, out)
    except BaseException:
        discard(stage)
        raise
    return manifest


def _sum_by(counts: dict[tuple, int], key: Callable[[tuple], object], where: Callable[[tuple], bool] = lambda _: True) -> dict:
    """Sum ``count_by`` counts into the groups that ``key`` returns, over the keys that ``where`` accepts."""
    sums: dict = {}
    for full_key, n in counts.items():
        if where(full_key):
            group = key(full_key)
            sums[group] = sums.get(group, 0) + n
    return sums


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line of the downsampling job."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline config file (TOML)")
    parser.add_argument("--labelled", required=True, help="output folder of spark_jobs/label_join.py")
    parser.add_argument("--out", required=True, help="output folder for train/, eval/ and _manifest.json")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. downsampling.seed=3 (repeatable)",
    )
    parser.add_argument(
        "--master", default=None, help="Spark master if no session is active (default: the one spark-submit sets)"
    )
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def _main(argv: list[str] | None = None) -> int:
    """Run the downsampling job from the command line and return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    check_keep_rate_keys(cfg)

    spark, created_here = get_or_create_session("valuerank-downsample", master=args.master)
    try:
        manifest = run_downsample(
            spark, cfg, args.labelled, args.out, row_group_rows=args.row_group_rows, file_rows=args.file_rows
        )
    finally:
        if created_here:
            spark.stop()

    train = manifest["train"]
    logger.info(
        "downsample done: train %d of %d rows kept, eval %d rows, eval start %s, output %s",
        train["rows_out"],
        train["rows_in"],
        manifest["eval"]["rows_out"],
        manifest["split"]["eval_start"],
        args.out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the job from the command line; report bad input in one line and return 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
