"""A skewed log (one hot user, one hot impression, many NULL keys) is spread over tasks, read from Spark's task metrics."""

from __future__ import annotations

import copy
import random
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import label_join
from spark_jobs.common import datetime_to_micros
from valuerank.config import config_from_dict

T0_US = datetime_to_micros(datetime(2022, 4, 20, tzinfo=timezone.utc))
IMPRESSIONS = 4000
CONFIG = {
    "actions": [{"name": "click", "attribution_window": "1h"}],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "columns": {"timestamp_unit": "us"},
    "split": {"eval_days": 1.0},
}


def skewed_log(folder):
    """Write a log where user 1 has half of the rows, 3 in 8 impressions have a NULL id, 1 in 8 a NULL user, and impression 7 has a fifth of the events.

    A window keyed by user, or by impression id with the NULL ids in it, would give one task
    more than 45% of a stage's rows.
    """
    generator = random.Random(3)
    impression_ids, users, items, times = [], [], [], []
    for i in range(IMPRESSIONS):
        hot = i % 2 == 0
        impression_ids.append(None if i % 8 in (1, 5, 7) else i)
        users.append(None if i % 8 == 3 else (1 if hot else generator.randrange(2, 500)))
        items.append(generator.randrange(1, 400))
        times.append(T0_US + generator.randrange(0, 3 * 86_400) * 1_000_000)
    pq.write_table(
        pa.table({
            "impression_id": pa.array(impression_ids, pa.int64()),
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "timestamp": pa.array(times, pa.int64()),
        }),
        folder / "impressions.parquet",
    )

    event_users, event_items, event_times, event_impressions = [], [], [], []
    for i in range(IMPRESSIONS):
        if i % 5 == 0:
            event_impressions.append(7)
            event_users.append(None)
            event_items.append(None)
        else:
            event_impressions.append(None)
            event_users.append(users[i])
            event_items.append(items[i])
        event_times.append(times[i] + 60_000_000)
    pq.write_table(
        pa.table({
            "user_id": pa.array(event_users, pa.int64()),
            "item_id": pa.array(event_items, pa.int64()),
            "action": pa.array(["click"] * IMPRESSIONS),
            "timestamp": pa.array(event_times, pa.int64()),
            "impression_id": pa.array(event_impressions, pa.int64()),
        }),
        folder / "events.parquet",
    )
    return folder / "impressions.parquet", folder / "events.parquet"


def shuffle_records_per_task(spark, group: str) -> dict[int, list[int]]:
    """Return {stage id: shuffle records read by each task} for the jobs of ``group``, from Spark's status store."""
    context = spark.sparkContext
    tracker = context.statusTracker()
    store = context._jsc.sc().statusStore()
    result = {}
    for job in tracker.getJobIdsForGroup(group):
        for stage in tracker.getJobInfo(job).stageIds:
            info = tracker.getStageInfo(stage)
            if info is None or info.numCompletedTasks == 0:
                continue
            tasks = store.taskList(stage, info.currentAttemptId, 100_000)
            records = []
            for i in range(tasks.size()):
                metrics = tasks.apply(i).taskMetrics()
                if metrics.isDefined():
                    records.append(metrics.get().shuffleReadMetrics().recordsRead())
            result[stage] = records
    return result


@pytest.fixture
def small_partitions_kept(spark):
    """Keep one task per shuffle partition: AQE would otherwise merge this small data into one task."""
    key = "spark.sql.adaptive.coalescePartitions.enabled"
    previous = spark.conf.get(key)
    spark.conf.set(key, "false")
    yield
    spark.conf.set(key, previous)


def test_skewed_log_spread_over_tasks(spark, tmp_path, small_partitions_kept):
    impressions, events = skewed_log(tmp_path)
    cfg = config_from_dict(copy.deepcopy(CONFIG))
    group = f"skew-{tmp_path.name}"

    spark.sparkContext.setJobGroup(group, "skewed label join")
    try:
        label_join.run_label_join(spark, cfg, str(impressions), str(events), str(tmp_path / "out"), file_rows=200)
    finally:
        spark.sparkContext.setJobGroup("", "")

    stages = shuffle_records_per_task(spark, group)
    large = {stage: records for stage, records in stages.items() if sum(records) >= IMPRESSIONS // 2}
    shares = {stage: max(records) / sum(records) for stage, records in large.items()}
    assert large, f"no stage read {IMPRESSIONS // 2} shuffle records: {stages}"
    assert max(shares.values()) < 0.45, shares
