"""Date-partitioned output, row-group sizes, atomic replacement (including a killed job) and UTC dates under another time zone."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import downsample, label_join
from spark_jobs.common import MANIFEST_NAME, datetime_to_micros
from spark_jobs.output import commit, date_folders, recover_and_clean
from valuerank.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2022, 4, 20, tzinfo=timezone.utc)

CONFIG = {
    "actions": [{"name": "click", "attribution_window": "1h"}],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "split": {"eval_days": 1.0},
}

CONFIG_TOML = """
[[actions]]
name = "click"
attribution_window = "1h"

[[sparse_features]]
name = "item"
column = "item_id"
num_embeddings = 100

[split]
eval_days = 1.0
"""


def make_config():
    return config_from_dict(copy.deepcopy(CONFIG))


def write_log(folder: Path, days: list[int], per_day: int, first_id: int = 1) -> tuple[Path, Path]:
    """Write ``per_day`` impressions on each day offset in ``days`` (every third one clicked) and return the paths."""
    ids, times = [], []
    for day in days:
        for i in range(per_day):
            ids.append(first_id + len(ids))
            times.append(T0 + timedelta(days=day, seconds=60 * i))
    impressions = pa.table(
        {
            "impression_id": pa.array(ids, pa.int64()),
            "user_id": pa.array([i % 7 for i in ids], pa.int64()),
            "item_id": pa.array(ids, pa.int64()),
            "timestamp": pa.array(times, pa.timestamp("us", tz="UTC")),
        }
    )
    clicked = [i for i in range(len(ids)) if ids[i] % 3 == 0]
    events = pa.table(
        {
            "user_id": pa.array([ids[i] % 7 for i in clicked], pa.int64()),
            "item_id": pa.array([ids[i] for i in clicked], pa.int64()),
            "action": pa.array(["click"] * len(clicked)),
            "timestamp": pa.array([times[i] + timedelta(minutes=5) for i in clicked], pa.timestamp("us", tz="UTC")),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(impressions, folder / "impressions.parquet")
    pq.write_table(events, folder / "events.parquet")
    return folder / "impressions.parquet", folder / "events.parquet"


def ids_by_date(out: Path) -> dict[str, list[int]]:
    """Read each dt= folder with pyarrow and return its sorted impression ids."""
    return {
        date: sorted(pq.read_table(folder, columns=["impression_id"]).column("impression_id").to_pylist())
        for date, folder in date_folders(out).items()
    }


def join(spark, log, out, as_of, **options):
    impressions, events = log
    return label_join.run_label_join(
        spark, make_config(), str(impressions), str(events), str(out), as_of=as_of, **options
    )


def test_output_partitioned_by_utc_date(spark, tmp_path):
    log = write_log(tmp_path / "log", days=[0, 1, 2], per_day=4)
    out = tmp_path / "labelled"

    manifest = join(spark, log, out, as_of=T0 + timedelta(days=4))

    assert sorted(ids_by_date(out)) == ["2022-04-20", "2022-04-21", "2022-04-22"]
    assert ids_by_date(out)["2022-04-21"] == [5, 6, 7, 8]
    assert manifest["partitions"]["2022-04-21"] == {"impressions_in": 4, "rows_out": 4, "held_back": 0, "dropped": 0}


def test_partition_column_not_in_files(spark, tmp_path):
    log = write_log(tmp_path / "log", days=[0], per_day=3)
    out = tmp_path / "labelled"

    join(spark, log, out, as_of=T0 + timedelta(days=2))

    file = next(out.glob("dt=*/part-*.parquet"))
    assert "dt" not in pq.read_schema(file).names


def test_row_groups_limited_and_files_split(spark, tmp_path):
    log = write_log(tmp_path / "log", days=[0], per_day=40)
    out = tmp_path / "labelled"

    join(spark, log, out, as_of=T0 + timedelta(days=2), row_group_rows=4, file_rows=20)

    files = sorted((out / "dt=2022-04-20").glob("part-*.parquet"))
    groups = [pq.ParquetFile(file).metadata.row_group(i).num_rows for file in files for i in range(pq.ParquetFile(file).num_row_groups)]
    assert len(files) >= 2
    assert max(groups) <= 4
    assert sum(groups) == 40


def test_manifest_counts_equal_files(spark, tmp_path):
    log = write_log(tmp_path / "log", days=[0, 1], per_day=6)
    out = tmp_path / "labelled"

    manifest = join(spark, log, out, as_of=T0 + timedelta(days=1, minutes=200))

    table = pq.read_table(out)
    assert manifest["impressions"]["rows_out"] == table.num_rows
    assert manifest["positives"]["click"] == sum(table.column("label_click").to_pylist())
    assert {d: p["rows_out"] for d, p in manifest["partitions"].items()} == {d: len(i) for d, i in ids_by_date(out).items()}


def test_rerun_replaces_its_dates_and_keeps_others(spark, tmp_path):
    out = tmp_path / "labelled"
    join(spark, write_log(tmp_path / "first", days=[0, 1], per_day=4), out, as_of=T0 + timedelta(days=3))

    # The second run covers days 1 and 2 with other impression ids.
    second = write_log(tmp_path / "second", days=[1, 2], per_day=3, first_id=100)
    manifest = join(spark, second, out, as_of=T0 + timedelta(days=4))

    assert ids_by_date(out) == {"2022-04-20": [1, 2, 3, 4], "2022-04-21": [100, 101, 102], "2022-04-22": [103, 104, 105]}
    assert manifest["partitions_kept_from_earlier_runs"] == {"2022-04-20": 4}
    assert pq.read_table(out).num_rows == 10


def test_rerun_same_dates_no_duplicates(spark, tmp_path):
    log = write_log(tmp_path / "log", days=[0, 1], per_day=5)
    out = tmp_path / "labelled"
    join(spark, log, out, as_of=T0 + timedelta(days=3))

    join(spark, log, out, as_of=T0 + timedelta(days=3))

    ids = pq.read_table(out).column("impression_id").to_pylist()
    assert sorted(ids) == list(range(1, 11))
    assert not list(tmp_path.glob(".labelled.*"))


def test_downsample_partitioned_and_replaced(spark, tmp_path):
    labelled = tmp_path / "labelled"
    join(spark, write_log(tmp_path / "log", days=[0, 1, 2, 3], per_day=6), labelled, as_of=T0 + timedelta(days=5))
    out = tmp_path / "downsampled"
    downsample.run_downsample(spark, make_config(), str(labelled), str(out))

    manifest = downsample.run_downsample(spark, make_config(), str(labelled), str(out))

    assert sorted(date_folders(out / "eval")) == ["2022-04-22", "2022-04-23"]
    assert manifest["partitions"]["eval"] == {date: len(ids) for date, ids in ids_by_date(out / "eval").items()}
    assert pq.read_table(out / "eval").num_rows == manifest["eval"]["rows_out"]
    assert pq.read_table(out / "train").num_rows == manifest["train"]["rows_out"]


def test_commit_swaps_whole_folder(tmp_path):
    out = tmp_path / "out"
    (out / "dt=2022-04-20").mkdir(parents=True)
    (out / "dt=2022-04-20" / "old.parquet").write_text("old")
    stage = tmp_path / ".out.staging-1"
    (stage / "dt=2022-04-21").mkdir(parents=True)
    (stage / "dt=2022-04-21" / "new.parquet").write_text("new")

    commit(stage, out)

    assert sorted(p.name for p in out.iterdir()) == ["dt=2022-04-21"]
    assert not stage.exists()


def test_recover_restores_folder_moved_aside(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-1"
    aside.mkdir()
    (aside / MANIFEST_NAME).write_text("{}")
    (tmp_path / ".out.staging-2").mkdir()

    recover_and_clean(out)

    assert (out / MANIFEST_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``python -m spark_jobs.<job>`` in its own process group, reading its log lines from stdout."""
    return subprocess.Popen(
        [sys.executable, "-u", "-m", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_killed_job_leaves_previous_output(spark, tmp_path):
    out = tmp_path / "labelled"
    join(spark, write_log(tmp_path / "first", days=[0, 1], per_day=4), out, as_of=T0 + timedelta(days=3))
    before = ids_by_date(out)
    manifest_before = (out / MANIFEST_NAME).read_text()
    impressions, events = write_log(tmp_path / "second", days=[0, 1, 2], per_day=30, first_id=1000)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TOML)

    # Kill the whole process group (Python driver and its JVM) once the job starts writing.
    job = run_cli(
        ["spark_jobs.label_join", "--config", str(config), "--impressions", str(impressions), "--events", str(events),
         "--out", str(out), "--as-of", "2022-04-25T00:00:00Z", "--master", "local[1]"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    seen = []
    for line in job.stdout:
        seen.append(line)
        if "writing the new output to the staging folder" in line:
            os.killpg(job.pid, signal.SIGKILL)
            break
    job.wait()
    job.stdout.close()

    assert job.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert not any("committing" in line for line in seen)
    assert ids_by_date(out) == before
    assert (out / MANIFEST_NAME).read_text() == manifest_before
    assert pq.read_table(out).num_rows == 8


def test_rerun_after_kill_cleans_staging(spark, tmp_path):
    out = tmp_path / "labelled"
    stale = tmp_path / ".labelled.staging-deadbeef"
    (stale / "dt=2022-04-20").mkdir(parents=True)
    (stale / "dt=2022-04-20" / "part-0.parquet").write_text("half written")

    join(spark, write_log(tmp_path / "log", days=[0], per_day=3), out, as_of=T0 + timedelta(days=2))

    assert not stale.exists()
    assert ids_by_date(out) == {"2022-04-20": [1, 2, 3]}


# --- time zones --------------------------------------------------------------

SPRING = datetime(2022, 3, 13, 6, 30, tzinfo=timezone.utc)  # 01:30 EST; clocks in New York jump at 07:00 UTC
AUTUMN = datetime(2022, 11, 6, 5, 30, tzinfo=timezone.utc)  # 01:30 EDT; clocks in New York fall back at 06:00 UTC
LATE_EVENING = datetime(2022, 3, 14, 2, 0, tzinfo=timezone.utc)  # 22:00 on 2022-03-13 in New York


def test_utc_under_new_york_time_zone_across_dst(tmp_path):
    """Run the CLI with Python and the JVM in America/New_York; labels and dates must follow UTC."""
    new_york = "America/New_York"
    impressions = pa.table(
        {
            "impression_id": pa.array([1, 2, 3, 4], pa.int64()),
            "user_id": pa.array([1, 2, 3, 4], pa.int64()),
            "item_id": pa.array([1, 2, 3, 4], pa.int64()),
            "timestamp": pa.array([SPRING, SPRING, LATE_EVENING, AUTUMN], pa.timestamp("us", tz=new_york)),
        }
    )
    naive = [t.replace(tzinfo=None) for t in (SPRING + timedelta(hours=1), SPRING + timedelta(hours=1, seconds=1))]
    events_naive = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "item_id": pa.array([1, 2], pa.int64()),
            "action": pa.array(["click", "click"]),
            "timestamp": pa.array(naive, pa.timestamp("us")),
        }
    )
    # 06:25 UTC is 01:25 EST, before the impression's local 01:30 EDT, but 55 minutes after it.
    events_epoch = pa.table(
        {
            "user_id": pa.array([4, 3], pa.int64()),
            "item_id": pa.array([4, 3], pa.int64()),
            "action": pa.array(["click", "click"]),
            "timestamp": pa.array(
                [datetime_to_micros(AUTUMN + timedelta(minutes=55)) // 1000, datetime_to_micros(LATE_EVENING) // 1000],
                pa.int64(),
            ),
        }
    )
    (tmp_path / "events").mkdir()
    pq.write_table(impressions, tmp_path / "impressions.parquet")
    pq.write_table(events_naive, tmp_path / "events" / "part-0.parquet")
    pq.write_table(events_epoch, tmp_path / "events" / "part-1.parquet")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TOML + '\n[columns]\ntimestamp_unit = "ms"\n')
    out = tmp_path / "labelled"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TZ": new_york,
        "JAVA_TOOL_OPTIONS": f"-Duser.timezone={new_york}",
    }

    job = run_cli(
        ["spark_jobs.label_join", "--config", str(config), "--impressions", str(tmp_path / "impressions.parquet"),
         "--events", str(tmp_path / "events"), "--out", str(out), "--as-of", "2022-11-06T20:00:00-05:00",
         "--master", "local[1]"],
        env=env,
    )
    output, _ = job.communicate()

    assert job.returncode == 0, output[-3000:]
    assert f"Picked up JAVA_TOOL_OPTIONS: -Duser.timezone={new_york}" in output
    rows = {row["impression_id"]: row for row in pq.read_table(out).to_pylist()}
    assert {i: row["label_click"] for i, row in rows.items()} == {1: 1, 2: 0, 3: 1, 4: 1}
    assert sorted(date_folders(out)) == ["2022-03-13", "2022-03-14", "2022-11-06"]
    assert rows[3]["timestamp"] == LATE_EVENING
    assert json.loads((out / MANIFEST_NAME).read_text())["as_of"] == "2022-11-07T01:00:00Z"
