"""Bad inputs and bad configs fail early with one error that names the file or key, the column and the fix."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from spark_jobs import downsample, label_join
from spark_jobs.common import ColumnSpec, EmptyOutputError, InputSchemaError, inspect_parquet_input, read_parquet_input
from valuerank.config import ConfigError, config_from_dict

T0 = datetime(2022, 4, 20, tzinfo=timezone.utc)
T0_MS = 1_650_412_800_000

CONFIG = {
    "actions": [{"name": "click", "attribution_window": "1h"}],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "split": {"eval_days": 1.0},
}


def make_config(**sections):
    data = copy.deepcopy(CONFIG)
    data.update(sections)
    return config_from_dict(data)


def impressions(**overrides) -> dict:
    columns = {
        "impression_id": pa.array([1, 2], pa.int64()),
        "user_id": pa.array([1, 2], pa.int64()),
        "item_id": pa.array([1, 2], pa.int64()),
        "timestamp": pa.array([T0_MS, T0_MS], pa.int64()),
    }
    columns.update(overrides)
    return {name: value for name, value in columns.items() if value is not None}


def events(**overrides) -> dict:
    columns = {
        "user_id": pa.array([1], pa.int64()),
        "item_id": pa.array([1], pa.int64()),
        "action": pa.array(["click"]),
        "timestamp": pa.array([T0_MS + 1000], pa.int64()),
    }
    columns.update(overrides)
    return {name: value for name, value in columns.items() if value is not None}


def run_join(spark, tmp_path, cfg=None, as_of=None):
    out = tmp_path / "labelled"
    label_join.run_label_join(
        spark, cfg or make_config(), str(tmp_path / "impressions"), str(tmp_path / "events"), str(out), as_of=as_of
    )


def test_missing_column_names_file_and_fix(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    bad = write_parquet_file("impressions/part-1.parquet", impressions(item_id=None))
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    message = str(error.value)
    assert str(bad) in message
    assert "part-0" not in message
    assert "missing column 'item_id'" in message
    assert "set columns.impressions.item_id" in message
    assert not (tmp_path / "labelled").exists()


def test_renamed_column_missing_names_config_key(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    write_parquet_file("events/part-0.parquet", events())
    cfg = make_config(columns={"impressions": {"user_id": "viewer"}})

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path, cfg)

    assert "missing column 'viewer'" in str(error.value)
    assert "columns.impressions.user_id" in str(error.value)


def test_string_id_column_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    bad = write_parquet_file("events/part-0.parquet", events(user_id=pa.array(["u1"])))

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    message = str(error.value)
    assert str(bad) in message
    assert "column 'user_id'" in message
    assert "ids must be integers" in message
    assert "map the string ids to int64" in message


def test_float_id_column_rejected(spark, tmp_path, write_parquet_file):
    bad = write_parquet_file("impressions/part-0.parquet", impressions(item_id=pa.array([1.0, 2.0])))
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    assert str(bad) in str(error.value)
    assert "cast the column to int64" in str(error.value)


def test_text_timestamp_rejected(spark, tmp_path, write_parquet_file):
    bad = write_parquet_file(
        "impressions/part-0.parquet", impressions(timestamp=pa.array(["2022-04-20 00:00", "2022-04-20 00:01"]))
    )
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    message = str(error.value)
    assert str(bad) in message
    assert "column 'timestamp'" in message
    assert "columns.timestamp_unit ('ms')" in message


def test_text_action_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    bad = write_parquet_file("events/part-0.parquet", events(action=pa.array([3], pa.int32())))

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    assert str(bad) in str(error.value)
    assert "column 'action'" in str(error.value)


def test_column_clash_after_rename_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions(viewer=pa.array([1, 2], pa.int64())))
    write_parquet_file("events/part-0.parquet", events())
    cfg = make_config(columns={"impressions": {"user_id": "viewer"}})

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path, cfg)

    assert "column 'user_id' clashes with column 'viewer'" in str(error.value)


def test_label_column_in_input_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions(label_click=pa.array([0, 1], pa.int8())))
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    assert "column 'label_click'" in str(error.value)


def test_non_parquet_file_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    stray = tmp_path / "impressions" / "notes.txt"
    stray.write_text("not parquet")
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    assert str(stray) in str(error.value)
    assert "not a readable Parquet file" in str(error.value)


def test_missing_input_path_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    assert "impressions input not found" in str(error.value)


def test_invalid_as_of_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(ConfigError) as error:
        run_join(spark, tmp_path, as_of="yesterday")

    assert "--as-of" in str(error.value)


def test_nanosecond_and_naive_timestamps_read(spark, tmp_path, write_parquet_file):
    nanos = pa.array([1_650_412_800_123_456_789], pa.timestamp("ns", tz="UTC"))
    naive = pa.array([datetime(2022, 4, 20, 0, 0, 1)], pa.timestamp("us"))
    write_parquet_file("mixed/part-0.parquet", {"impression_id": pa.array([1]), "timestamp": nanos, "seen_at": nanos})
    write_parquet_file("mixed/part-1.parquet", {"impression_id": pa.array([2]), "timestamp": naive})
    specs = [ColumnSpec("impression_id", "impression_id", "id"), ColumnSpec("timestamp", "timestamp", "timestamp")]

    source = inspect_parquet_input("impressions", tmp_path / "mixed", specs, "columns.impressions", "ms")
    frame = read_parquet_input(spark, source, "ms", keep_other_columns=True)
    rows = frame.selectExpr(
        "impression_id", "unix_micros(timestamp) AS micros", "unix_micros(seen_at) AS seen_micros"
    ).collect()

    assert {row["impression_id"]: row["micros"] for row in rows} == {
        1: 1_650_412_800_123_456,
        2: 1_650_412_801_000_000,
    }
    assert {row["impression_id"]: row["seen_micros"] for row in rows} == {1: 1_650_412_800_123_456, 2: None}
    assert frame.schema["seen_at"].dataType.simpleString() == "timestamp"


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_keep_rate_outside_range_rejected(rate):
    with pytest.raises(ConfigError) as error:
        make_config(downsampling={"keep_rates": {"negative": rate}})

    assert "downsampling.keep_rates.negative" in str(error.value)
    assert "outside (0, 1]" in str(error.value)


def test_unknown_config_key_rejected():
    with pytest.raises(ConfigError) as error:
        make_config(downsampling={"keep_rate": {"negative": 0.5}})

    assert "unknown key downsampling.keep_rate" in str(error.value)


def test_keep_rate_key_with_unknown_pattern_rejected():
    cfg = make_config(downsampling={"keep_rates": {"negtive": 0.5}})

    with pytest.raises(ConfigError) as error:
        downsample.check_keep_rate_keys(cfg)

    assert "downsampling.keep_rates.negtive" in str(error.value)
    assert "'negative'" in str(error.value)


def test_keep_rate_key_with_value_needs_stratum_column():
    cfg = make_config(downsampling={"keep_rates": {"feed/negative": 0.5}})

    with pytest.raises(ConfigError) as error:
        downsample.check_keep_rate_keys(cfg)

    assert "downsampling.keep_rates.feed/negative" in str(error.value)
    assert "downsampling.stratum_column" in str(error.value)


def test_derived_zero_keep_rate_rejected():
    cfg = make_config(downsampling={"stratum_column": "surface", "target_negative_ratio": 2.0})
    counts = {"feed/negative": 50, "feed/click": 5, "search/negative": 40}

    with pytest.raises(ConfigError) as error:
        downsample.derive_keep_rates(counts, cfg)

    assert "'search/negative'" in str(error.value)
    assert "downsampling.keep_rates.search/negative" in str(error.value)


def test_missing_stratum_column_rejected(spark, tmp_path, write_parquet_file):
    labelled = write_parquet_file(
        "labelled/part-0.parquet",
        {
            "impression_id": pa.array([1], pa.int64()),
            "timestamp": pa.array([T0], pa.timestamp("us", tz="UTC")),
            "label_click": pa.array([1], pa.int8()),
        },
    )
    cfg = make_config(downsampling={"stratum_column": "surface"})

    with pytest.raises(InputSchemaError) as error:
        downsample.run_downsample(spark, cfg, str(labelled.parent), str(tmp_path / "out"))

    assert "missing stratum column 'surface'" in str(error.value)
    assert "downsampling.stratum_column" in str(error.value)


def test_config_action_absent_from_events_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    write_parquet_file("events/part-0.parquet", events())
    cfg = make_config(actions=[
        {"name": "click", "attribution_window": "1h"},
        {"name": "purchse", "attribution_window": "1d"},
    ])

    with pytest.raises(ConfigError) as error:
        run_join(spark, tmp_path, cfg)

    message = str(error.value)
    assert "actions[1].name" in message
    assert "'purchse'" in message
    assert "actions present: click" in message
    assert "--allow-absent-actions" in message


def test_absent_action_allowed_when_requested(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    write_parquet_file("events/part-0.parquet", events())
    cfg = make_config(actions=[
        {"name": "click", "attribution_window": "1h"},
        {"name": "purchase", "attribution_window": "1d"},
    ])
    out = tmp_path / "labelled"

    manifest = label_join.run_label_join(
        spark, cfg, str(tmp_path / "impressions"), str(tmp_path / "events"), str(out),
        as_of=datetime(2022, 4, 21, tzinfo=timezone.utc), allow_absent_actions=True,
    )

    assert manifest["positives"] == {"click": 1, "purchase": 0}


def labelled_file(write_parquet_file, times, **extra) -> Path:
    """Write a labelled folder with one row per time in ``times`` and return the folder."""
    columns = {
        "impression_id": pa.array(range(1, len(times) + 1), pa.int64()),
        "item_id": pa.array(range(1, len(times) + 1), pa.int64()),
        "timestamp": pa.array(times, pa.timestamp("us", tz="UTC")),
        "label_click": pa.array([i % 2 for i in range(len(times))], pa.int8()),
    }
    columns.update(extra)
    return write_parquet_file("labelled/part-0.parquet", columns).parent


def test_impressions_without_rows_rejected(spark, tmp_path, write_parquet_file):
    empty = {name: column.slice(0, 0) for name, column in impressions().items()}
    write_parquet_file("impressions/part-0.parquet", empty)
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(InputSchemaError) as error:
        run_join(spark, tmp_path)

    assert f"impressions input {tmp_path / 'impressions'} contains no rows" in str(error.value)
    assert not (tmp_path / "labelled").exists()


def test_seconds_read_as_millis_explained(spark, tmp_path, write_parquet_file):
    seconds = T0_MS // 1000
    write_parquet_file("impressions/part-0.parquet", impressions(timestamp=pa.array([seconds, seconds], pa.int64())))
    write_parquet_file("events/part-0.parquet", events(timestamp=pa.array([seconds + 60], pa.int64())))

    with pytest.raises(EmptyOutputError) as error:
        run_join(spark, tmp_path)

    message = str(error.value)
    assert "no impression was labelled" in message
    assert "as_of 1970-01-20T02:26:52.860000Z (max_event_timestamp)" in message
    assert "impressions span 1970-01-20T02:26:52.800000Z to 1970-01-20T02:26:52.800000Z" in message
    assert "2 held back" in message
    assert "0 dropped" in message
    assert "columns.timestamp_unit ('ms')" in message
    assert "--as-of" in message
    assert not (tmp_path / "labelled").exists()


def test_all_impressions_dropped_explained(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions(user_id=pa.array([None, None], pa.int64())))
    write_parquet_file("events/part-0.parquet", events())

    with pytest.raises(EmptyOutputError) as error:
        run_join(spark, tmp_path, as_of=datetime(2022, 4, 21, tzinfo=timezone.utc))

    message = str(error.value)
    assert "0 held back" in message
    assert "2 dropped (null_user_id 2)" in message
    assert not (tmp_path / "labelled").exists()


def test_join_missing_feature_column_rejected(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions())
    write_parquet_file("events/part-0.parquet", events())
    cfg = make_config(dense_features=[{"column": "price"}])

    with pytest.raises(ConfigError) as error:
        run_join(spark, tmp_path, cfg)

    message = str(error.value)
    assert "dense_features[0].column: column 'price' is not in the impressions input" in message
    assert "impression_id, user_id, item_id, timestamp" in message
    assert not (tmp_path / "labelled").exists()


def test_join_feature_uses_canonical_names(spark, tmp_path, write_parquet_file):
    write_parquet_file("impressions/part-0.parquet", impressions(item_id=None, product=pa.array([1, 2], pa.int64())))
    write_parquet_file("events/part-0.parquet", events())
    cfg = make_config(
        columns={"impressions": {"item_id": "product"}},
        sparse_features=[{"name": "item", "column": "product", "num_embeddings": 100}],
    )

    with pytest.raises(ConfigError) as error:
        run_join(spark, tmp_path, cfg)

    message = str(error.value)
    assert "sparse_features[0].column: column 'product'" in message
    assert "item_id" in message


def test_downsample_missing_feature_column_rejected(spark, tmp_path, write_parquet_file):
    labelled = labelled_file(write_parquet_file, [T0, T0 + timedelta(days=2)])
    cfg = make_config(sparse_features=[
        {"name": "item", "column": "item_id", "num_embeddings": 100},
        {"name": "author", "column": "author_id", "num_embeddings": 100},
    ])

    with pytest.raises(ConfigError) as error:
        downsample.run_downsample(spark, cfg, str(labelled), str(tmp_path / "out"))

    message = str(error.value)
    assert "sparse_features[1].column: column 'author_id' is not in the labelled input" in message
    assert "impression_id, item_id, timestamp, label_click" in message
    assert not (tmp_path / "out").exists()


def test_long_column_list_abbreviated(spark, tmp_path, write_parquet_file):
    extra = {f"feature_{i:02d}": pa.array([0.0, 1.0]) for i in range(40)}
    labelled = labelled_file(write_parquet_file, [T0, T0 + timedelta(days=2)], **extra)
    cfg = make_config(dense_features=[{"column": "feature_99"}])

    with pytest.raises(ConfigError) as error:
        downsample.run_downsample(spark, cfg, str(labelled), str(tmp_path / "out"))

    message = str(error.value)
    assert "feature_10" in message
    assert "feature_39" not in message
    assert "and 28 more" in message


def test_empty_eval_split_explained(spark, tmp_path, write_parquet_file):
    labelled = labelled_file(write_parquet_file, [T0, T0 + timedelta(days=2)])
    cfg = make_config(split={"eval_start": "2022-05-01T00:00:00Z"})

    with pytest.raises(EmptyOutputError) as error:
        downsample.run_downsample(spark, cfg, str(labelled), str(tmp_path / "out"))

    message = str(error.value)
    assert "the eval split is empty" in message
    assert "eval start 2022-05-01T00:00:00Z (from split.eval_start)" in message
    assert "labelled timestamps span 2022-04-20T00:00:00Z to 2022-04-22T00:00:00Z" in message
    assert "change split.eval_start" in message
    assert not (tmp_path / "out").exists()


def test_empty_training_split_explained(spark, tmp_path, write_parquet_file):
    labelled = labelled_file(write_parquet_file, [T0, T0 + timedelta(days=2)])
    cfg = make_config(split={"eval_days": 5.0})

    with pytest.raises(EmptyOutputError) as error:
        downsample.run_downsample(spark, cfg, str(labelled), str(tmp_path / "out"))

    message = str(error.value)
    assert "the training split is empty" in message
    assert "eval start 2022-04-17T00:00:00Z (from split.eval_days)" in message
    assert "labelled timestamps span 2022-04-20T00:00:00Z to 2022-04-22T00:00:00Z" in message
    assert "lower split.eval_days" in message


def test_job_main_reports_bad_input_with_exit_two(spark, tmp_path, write_parquet_file, caplog):
    write_parquet_file("impressions/part-0.parquet", impressions())
    write_parquet_file("events/part-0.parquet", events())
    config = tmp_path / "config.toml"
    config.write_text(
        '[[actions]]\nname = "click"\nattribution_window = "1h"\n'
        '[[sparse_features]]\nname = "item"\ncolumn = "item_id"\nnum_embeddings = 100\n'
        "[split]\neval_days = 1.0\n"
    )
    argv = ["--config", str(config), "--impressions", str(tmp_path / "impressions"), "--events", str(tmp_path / "events")]

    code = label_join.main([*argv, "--out", str(tmp_path / "impressions")])

    assert code == 2
    assert "is the same path as the impressions input" in caplog.text
    assert (tmp_path / "impressions" / "part-0.parquet").exists()
