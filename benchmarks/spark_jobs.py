"""Rows per second of the Spark label join and downsampling against the same work in DuckDB, in one run.

    .venv/bin/python benchmarks/spark_jobs.py [--impressions 10000000] [--json runs/bench/spark_jobs.json]

The script generates a log (impressions over 7 days, about 12% of them with a click or a
purchase event, half of the events carrying the impression id, 1% duplicated events), then
runs on the same Parquet files:

- Spark in local mode (``local[*]``): ``spark_jobs.label_join`` and ``spark_jobs.downsample``,
  including their checks, manifests and the partitioned, atomically committed output.
- DuckDB with as many threads: the reference SQL of ``tests/reference/duckdb_jobs.py``, reading
  the Parquet files and writing the labelled and the downsampled rows as Parquet partitioned by date.
  DuckDB draws its keep decisions with its own ``hash`` instead of Spark's ``xxhash64``.

Rows per second are input rows (impressions for the label join, labelled rows for the
downsampling) over wall time. The ratios are Spark over DuckDB, so below 1 means DuckDB is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from reference import duckdb_jobs  # noqa: E402
from spark_jobs import downsample, label_join  # noqa: E402
from spark_jobs.common import build_session  # noqa: E402
from valuerank.config import config_from_dict  # noqa: E402

T0_US = 1_650_412_800_000_000  # 2022-04-20T00:00:00Z
DAY_US = 86_400 * 1_000_000
DAYS = 7
CONFIG = {
    "actions": [
        {"name": "click", "attribution_window": "1h"},
        {"name": "purchase", "attribution_window": "1d"},
    ],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100_000}],
    "split": {"eval_days": 1.0},
    "downsampling": {"seed": 7, "target_negative_ratio": 2.0},
}


def generate(folder: Path, impressions: int, files: int, seed: int = 0) -> tuple[Path, Path]:
    """Write the impression and event logs as ``files`` Parquet files each; return both folders."""
    generator = np.random.default_rng(seed)
    ids = np.arange(1, impressions + 1, dtype=np.int64)
    users = generator.zipf(1.3, impressions).astype(np.int64) % max(1, impressions // 50)
    items = generator.zipf(1.2, impressions).astype(np.int64) % max(1, impressions // 100)
    times = T0_US + np.sort(generator.integers(0, DAYS * DAY_US, impressions))
    position = generator.integers(0, 20, impressions).astype(np.int64)
    score = generator.random(impressions).astype(np.float32)

    clicked = generator.random(impressions) < 0.10
    purchased = clicked & (generator.random(impressions) < 0.2)
    event_rows = np.concatenate([np.flatnonzero(clicked), np.flatnonzero(purchased)])
    actions = np.array(["click"] * int(clicked.sum()) + ["purchase"] * int(purchased.sum()), dtype=object)
    delay = np.where(actions == "click", generator.integers(1, 3_600, len(event_rows)), generator.integers(60, 86_400, len(event_rows)))
    event_times = times[event_rows] + delay * 1_000_000
    with_id = generator.random(len(event_rows)) < 0.5
    copies = generator.random(len(event_rows)) < 0.01
    event_rows = np.concatenate([event_rows, event_rows[copies]])
    actions = np.concatenate([actions, actions[copies]])
    event_times = np.concatenate([event_times, event_times[copies]])
    with_id = np.concatenate([with_id, with_id[copies]])

    impressions_table = pa.table({
        "impression_id": ids,
        "user_id": users,
        "item_id": items,
        "timestamp": pa.array(times).cast(pa.timestamp("us", tz="UTC")),
        "position": position,
        "score": score,
    })
    events_table = pa.table({
        "user_id": users[event_rows],
        "item_id": items[event_rows],
        "action": pa.array(actions, pa.string()),
        "timestamp": pa.array(event_times).cast(pa.timestamp("us", tz="UTC")),
        "impression_id": pa.array(np.where(with_id, ids[event_rows], 0), mask=~with_id),
    })
    for name, table in (("impressions", impressions_table), ("events", events_table)):
        (folder / name).mkdir(parents=True)
        bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
        for i in range(files):
            pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), folder / name / f"part-{i}.parquet")
    return folder / "impressions", folder / "events"


def run_spark(impressions: Path, events: Path, work: Path) -> dict:
    cfg = config_from_dict(json.loads(json.dumps(CONFIG)))
    spark = build_session("valuerank-benchmark", master="local[*]", ui=False)
    spark.sparkContext.setLogLevel("ERROR")
    try:
        start = time.perf_counter()
        joined = label_join.run_label_join(spark, cfg, str(impressions), str(events), str(work / "labelled"))
        join_s = time.perf_counter() - start
        start = time.perf_counter()
        downsample.run_downsample(spark, cfg, str(work / "labelled"), str(work / "downsampled"))
        down_s = time.perf_counter() - start
    finally:
        spark.stop()
    return {"label_join_s": join_s, "downsample_s": down_s, "labelled_rows": joined["impressions"]["rows_out"]}


def run_duckdb(impressions: Path, events: Path, work: Path, threads: int) -> dict:
    (work / "downsampled").mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    actions = [duckdb_jobs.Action(a["name"], {"1h": 3_600, "1d": 86_400}[a["attribution_window"]] * 1_000_000) for a in CONFIG["actions"]]

    start = time.perf_counter()
    con.execute(f"CREATE VIEW imps AS SELECT * EXCLUDE (timestamp), epoch_us(timestamp) AS t FROM read_parquet('{impressions}/*.parquet')")
    con.execute(f"CREATE VIEW evs AS SELECT * EXCLUDE (timestamp), epoch_us(timestamp) AS t FROM read_parquet('{events}/*.parquet')")
    as_of = duckdb_jobs.default_as_of(con, "imps", "evs")
    duckdb_jobs.label_join(con, "imps", "evs", actions, as_of, tie_columns=["position", "score"])
    con.execute(f"""
        COPY (SELECT *, strftime(make_timestamp(t), '%Y-%m-%d') AS dt FROM ref_labelled)
        TO '{work / "labelled"}' (FORMAT parquet, PARTITION_BY (dt))
    """)
    join_s = time.perf_counter() - start
    labelled_rows = con.execute("SELECT count(*) FROM ref_labelled").fetchone()[0]

    start = time.perf_counter()
    con.execute(f"""
        CREATE VIEW labelled_in AS SELECT *, (hash(impression_id, 7) >> 11)::DOUBLE / 9007199254740992.0 AS keep_draw
        FROM read_parquet('{work / "labelled"}/*/*.parquet', hive_partitioning = false)
    """)
    settings = duckdb_jobs.DownsampleSettings(
        seed=7, eval_days=1.0, eval_start_us=None, keep_rates={}, keep_positives=True,
        target_negative_ratio=2.0, stratum_column=None,
    )
    duckdb_jobs.downsample(con, "labelled_in", actions, settings)
    for split in ("train", "eval"):
        con.execute(f"""
            COPY (SELECT l.* EXCLUDE (keep_draw), s.stratum, s.keep_rate, s.weight,
                         strftime(make_timestamp(l.t), '%Y-%m-%d') AS dt
                  FROM labelled_in l JOIN ref_{split} s USING (impression_id))
            TO '{work / "downsampled" / split}' (FORMAT parquet, PARTITION_BY (dt))
        """)
    down_s = time.perf_counter() - start
    return {"label_join_s": join_s, "downsample_s": down_s, "labelled_rows": labelled_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=10_000_000, help="impressions to generate (default 10M)")
    parser.add_argument("--files", type=int, default=8, help="Parquet files per input log")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="valuerank-bench-"))
    cores = os.cpu_count() or 1
    try:
        start = time.perf_counter()
        impressions, events = generate(work / "raw", args.impressions, args.files)
        print(f"generated {args.impressions} impressions in {time.perf_counter() - start:.1f} s under {work}")

        spark = run_spark(impressions, events, work / "spark")
        print(f"spark:  label join {spark['label_join_s']:.1f} s, downsample {spark['downsample_s']:.1f} s")
        duck = run_duckdb(impressions, events, work / "duckdb", cores)
        print(f"duckdb: label join {duck['label_join_s']:.1f} s, downsample {duck['downsample_s']:.1f} s")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    if spark["labelled_rows"] != duck["labelled_rows"]:
        print(f"warning: labelled rows differ: spark {spark['labelled_rows']}, duckdb {duck['labelled_rows']}")
    result = {
        "impressions": args.impressions,
        "cores": cores,
        "labelled_rows": spark["labelled_rows"],
        "spark": spark,
        "duckdb": duck,
        "label_join_rows_per_s": {"spark": args.impressions / spark["label_join_s"], "duckdb": args.impressions / duck["label_join_s"]},
        "downsample_rows_per_s": {
            "spark": spark["labelled_rows"] / spark["downsample_s"],
            "duckdb": duck["labelled_rows"] / duck["downsample_s"],
        },
    }
    result["label_join_spark_to_duckdb"] = result["label_join_rows_per_s"]["spark"] / result["label_join_rows_per_s"]["duckdb"]
    result["downsample_spark_to_duckdb"] = result["downsample_rows_per_s"]["spark"] / result["downsample_rows_per_s"]["duckdb"]
    print(f"label join rows/s: spark {result['label_join_rows_per_s']['spark']:,.0f}, duckdb {result['label_join_rows_per_s']['duckdb']:,.0f}, "
          f"spark/duckdb {result['label_join_spark_to_duckdb']:.3f}")
    print(f"downsample rows/s: spark {result['downsample_rows_per_s']['spark']:,.0f}, duckdb {result['downsample_rows_per_s']['duckdb']:,.0f}, "
          f"spark/duckdb {result['downsample_spark_to_duckdb']:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
