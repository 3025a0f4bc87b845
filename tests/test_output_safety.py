"""The jobs reject an output path that would delete an input or files that they did not write."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import downsample, label_join
from spark_jobs.common import MANIFEST_NAME, OutputPathError
from valuerank.config import config_from_dict

T0 = datetime(2022, 4, 20, tzinfo=timezone.utc)
T0_MS = 1_650_412_800_000
AS_OF = T0 + timedelta(days=1)

CONFIG = {
    "actions": [{"name": "click", "attribution_window": "1h"}],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "split": {"eval_days": 1.0},
}


def make_config():
    return config_from_dict(copy.deepcopy(CONFIG))


@pytest.fixture
def log(tmp_path, write_parquet_file):
    """Write a two-impression log with one click; return the impressions and events paths."""
    write_parquet_file(
        "impressions/part-0.parquet",
        {
            "impression_id": pa.array([1, 2], pa.int64()),
            "user_id": pa.array([1, 2], pa.int64()),
            "item_id": pa.array([1, 2], pa.int64()),
            "timestamp": pa.array([T0_MS, T0_MS], pa.int64()),
        },
    )
    write_parquet_file(
        "events/part-0.parquet",
        {
            "user_id": pa.array([1], pa.int64()),
            "item_id": pa.array([1], pa.int64()),
            "action": pa.array(["click"]),
            "timestamp": pa.array([T0_MS + 1000], pa.int64()),
        },
    )
    return tmp_path / "impressions", tmp_path / "events"


@pytest.fixture
def labelled(tmp_path, write_parquet_file):
    """Write a labelled folder spanning two days, so both splits have rows."""
    write_parquet_file(
        "labelled/part-0.parquet",
        {
            "impression_id": pa.array([1, 2, 3], pa.int64()),
            "item_id": pa.array([1, 2, 3], pa.int64()),
            "timestamp": pa.array([T0, T0 + timedelta(hours=12), T0 + timedelta(days=2)], pa.timestamp("us", tz="UTC")),
            "label_click": pa.array([1, 0, 0], pa.int8()),
        },
    )
    return tmp_path / "labelled"


def join(spark, log, out):
    impressions, events = log
    return label_join.run_label_join(spark, make_config(), str(impressions), str(events), str(out), as_of=AS_OF)


def test_join_output_equal_to_input_rejected(spark, log):
    impressions, _ = log

    with pytest.raises(OutputPathError) as error:
        join(spark, log, impressions)

    message = str(error.value)
    assert f"output {impressions.resolve()} is the same path as the impressions input" in message
    assert (impressions / "part-0.parquet").exists()


def test_join_output_inside_input_rejected(spark, log):
    impressions, _ = log
    out = impressions / "labelled"

    with pytest.raises(OutputPathError) as error:
        join(spark, log, out)

    assert f"is inside the impressions input {impressions.resolve()}" in str(error.value)
    assert not out.exists()


def test_join_output_containing_input_rejected(spark, log, tmp_path):
    with pytest.raises(OutputPathError) as error:
        join(spark, log, tmp_path)

    message = str(error.value)
    assert f"output {tmp_path.resolve()} contains the impressions input" in message
    assert (tmp_path / "events" / "part-0.parquet").exists()


def test_join_output_through_dot_dot_rejected(spark, log, tmp_path):
    _, events = log

    with pytest.raises(OutputPathError) as error:
        join(spark, log, tmp_path / "other" / ".." / "events")

    assert f"the events input {events.resolve()}" in str(error.value)


def test_downsample_output_equal_to_input_rejected(spark, labelled):
    with pytest.raises(OutputPathError) as error:
        downsample.run_downsample(spark, make_config(), str(labelled), str(labelled))

    assert "is the same path as the labelled input" in str(error.value)
    assert (labelled / "part-0.parquet").exists()


def test_downsample_output_containing_input_rejected(spark, labelled, tmp_path):
    with pytest.raises(OutputPathError) as error:
        downsample.run_downsample(spark, make_config(), str(labelled), str(tmp_path))

    assert "contains the labelled input" in str(error.value)


def test_folder_with_user_files_kept(spark, log, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")

    with pytest.raises(OutputPathError) as error:
        join(spark, log, out)

    message = str(error.value)
    assert f"output folder {out.resolve()} is not empty" in message
    assert "it has no valuerank manifest" in message
    assert "choose an empty or new folder, or delete this one" in message
    assert (out / "todo.txt").read_text() == "keep me"


def test_other_job_output_kept(spark, log, tmp_path):
    out = tmp_path / "labelled-out"
    join(spark, log, out)

    with pytest.raises(OutputPathError) as error:
        downsample.run_downsample(spark, make_config(), str(tmp_path / "impressions"), str(out))

    assert "its manifest names job 'label_join'" in str(error.value)
    assert json.loads((out / MANIFEST_NAME).read_text())["job"] == "label_join"


def test_output_file_rejected(spark, log, tmp_path):
    out = tmp_path / "report.txt"
    out.write_text("keep me")

    with pytest.raises(OutputPathError) as error:
        join(spark, log, out)

    assert f"output {out.resolve()} is a file" in str(error.value)
    assert out.read_text() == "keep me"


def test_empty_output_folder_accepted(spark, log, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()

    manifest = join(spark, log, out)

    assert manifest["impressions"]["rows_out"] == 2


def test_join_rerun_replaces_own_output(spark, log, tmp_path):
    out = tmp_path / "labelled-out"
    join(spark, log, out)

    manifest = join(spark, log, out)

    assert manifest["impressions"]["rows_out"] == 2
    assert pq.read_table(out).num_rows == 2


def test_downsample_rerun_replaces_own_output(spark, labelled, tmp_path):
    out = tmp_path / "downsampled"
    downsample.run_downsample(spark, make_config(), str(labelled), str(out))

    manifest = downsample.run_downsample(spark, make_config(), str(labelled), str(out))

    assert manifest["rows_in"] == 3
    assert pq.read_table(out / "eval").num_rows == 1
