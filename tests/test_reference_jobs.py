"""Property tests: the Spark jobs and the DuckDB reference (tests/reference) give identical output on random logs.

Random logs have window edges (times on a 15-minute grid with windows of 30 and 60
minutes, plus or minus 1 ms), ties, duplicate impressions and events, NULL keys, unknown
actions, and files whose timestamps are stored in different time zones and encodings.
"""

from __future__ import annotations

import copy
import itertools
import json
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spark_jobs import downsample, label_join
from spark_jobs.common import EmptyOutputError, MANIFEST_NAME, datetime_to_micros, micros_to_datetime
from reference import duckdb_jobs
from reference.duckdb_jobs import Action, DownsampleSettings, ReferenceRejects
from valuerank.config import ConfigError, config_from_dict

T0_US = datetime_to_micros(datetime(2022, 3, 12, 22, 0, tzinfo=timezone.utc))  # New York changes to DST within the grid
MINUTE_US = 60_000_000
ACTIONS = [Action("click", 30 * MINUTE_US), Action("purchase", 60 * MINUTE_US)]
CONFIG = {
    "actions": [
        {"name": "click", "attribution_window": "30m"},
        {"name": "purchase", "attribution_window": "1h"},
    ],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "columns": {"timestamp_unit": "ms"},
    "split": {"eval_days": 1.0},
}
ENCODINGS = ("utc_us", "new_york_ms", "kolkata_us", "naive_us", "epoch_ms")
SETTINGS = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

# --- strategies --------------------------------------------------------------

times = st.builds(
    lambda step, jitter: T0_US + step * 15 * MINUTE_US + jitter * 1000,
    st.integers(0, 16),
    st.sampled_from([0, 0, 0, -1, 1]),
)
maybe = lambda strategy: st.one_of(st.none(), strategy, strategy, strategy)  # noqa: E731
small_ids = st.integers(1, 4)
impression_rows = st.lists(
    st.tuples(maybe(st.integers(1, 9)), maybe(small_ids), maybe(small_ids), maybe(times), maybe(st.integers(0, 2))),
    min_size=1,
    max_size=12,
)
event_rows = st.lists(
    st.tuples(
        maybe(small_ids),
        maybe(small_ids),
        maybe(st.sampled_from(["click", "purchase", "share"])),
        maybe(times),
        st.one_of(st.none(), st.none(), st.integers(1, 10)),
    ),
    max_size=16,
)


def encode_times(micros: list[int | None], encoding: str) -> pa.Array:
    """Store UTC microseconds as one of the timestamp encodings that the jobs accept."""
    values = pa.array(micros, pa.int64())
    if encoding == "epoch_ms":
        return pc.divide(values, 1000)
    if encoding == "new_york_ms":
        return pc.divide(values, 1000).cast(pa.timestamp("ms", tz="America/New_York"))
    if encoding == "kolkata_us":
        return values.cast(pa.timestamp("us", tz="Asia/Kolkata"))
    if encoding == "naive_us":
        return values.cast(pa.timestamp("us"))
    return values.cast(pa.timestamp("us", tz="UTC"))


def write_files(folder: Path, columns: dict[str, list], id_columns: list[str], layout: list[tuple[str, pa.DataType]]) -> None:
    """Write the rows as one file per entry of ``layout`` (timestamp encoding, id type), in equal slices."""
    folder.mkdir(parents=True)
    rows = len(columns["t"])
    bounds = np.linspace(0, rows, len(layout) + 1).astype(int)
    for i, (encoding, id_type) in enumerate(layout):
        lo, hi = bounds[i], bounds[i + 1]
        table = {}
        for name, values in columns.items():
            part = values[lo:hi]
            if name == "t":
                table["timestamp"] = encode_times(part, encoding)
            elif name in id_columns:
                table[name] = pa.array(part, id_type)
            else:
                table[name] = pa.array(part, pa.string() if name == "action" else pa.int64())
        pq.write_table(pa.table(table), folder / f"part-{i}.parquet")


layouts = st.lists(st.tuples(st.sampled_from(ENCODINGS), st.sampled_from([pa.int32(), pa.int64()])), min_size=1, max_size=3)


def micros_column(table: pa.Table, name: str) -> list[int]:
    return [None if v is None else datetime_to_micros(v) for v in table.column(name).to_pylist()]


# --- label join --------------------------------------------------------------


@SETTINGS
@given(
    impressions=impression_rows,
    events=event_rows,
    impression_layout=layouts,
    event_layout=layouts,
    as_of_step=st.one_of(st.none(), st.integers(0, 20)),
)
def test_label_join_matches_reference(spark, tmp_path_factory, impressions, events, impression_layout, event_layout, as_of_step):
    folder = tmp_path_factory.mktemp("join")
    impression_columns = dict(zip(["impression_id", "user_id", "item_id", "t", "extra"], map(list, zip(*impressions))))
    event_columns = dict(
        zip(["user_id", "item_id", "action", "t", "impression_id"], map(list, zip(*events))) if events else
        [("user_id", []), ("item_id", []), ("action", []), ("t", []), ("impression_id", [])]
    )
    write_files(folder / "impressions", impression_columns, ["impression_id", "user_id", "item_id"], impression_layout)
    write_files(folder / "events", event_columns, ["user_id", "item_id", "impression_id"], event_layout[:1] if not events else event_layout)
    as_of_us = None if as_of_step is None else T0_US + as_of_step * 15 * MINUTE_US

    # Reference, from the exact values rather than the files.
    con = duckdb.connect()
    ref_impressions = pa.table({k: pa.array(v, pa.string() if k == "action" else pa.int64()) for k, v in impression_columns.items()})
    ref_events = pa.table({k: pa.array(v, pa.string() if k == "action" else pa.int64()) for k, v in event_columns.items()})
    con.register("impressions_in", ref_impressions)
    con.register("events_in", ref_events)
    effective_as_of = as_of_us if as_of_us is not None else duckdb_jobs.default_as_of(con, "impressions_in", "events_in")
    duckdb_jobs.label_join(con, "impressions_in", "events_in", ACTIONS, effective_as_of, tie_columns=["extra"])
    expected_rows = sorted(con.execute(
        "SELECT impression_id, user_id, item_id, t, extra, label_click, label_purchase FROM ref_labelled"
    ).fetchall())
    impression_outcomes = dict(con.execute("SELECT outcome, count(*) FROM ref_impressions GROUP BY outcome").fetchall())
    event_outcomes = dict(con.execute("SELECT outcome, count(*) FROM ref_events GROUP BY outcome").fetchall())

    out = folder / "labelled"
    cfg = config_from_dict(copy.deepcopy(CONFIG))
    as_of = None if as_of_us is None else micros_to_datetime(as_of_us)
    run = lambda: label_join.run_label_join(  # noqa: E731
        spark, cfg, str(folder / "impressions"), str(folder / "events"), str(out), as_of=as_of, allow_absent_actions=True
    )
    if not expected_rows:
        with pytest.raises(EmptyOutputError):
            run()
        return
    manifest = run()

    table = pq.read_table(out)
    actual_rows = sorted(zip(
        table.column("impression_id").to_pylist(),
        table.column("user_id").to_pylist(),
        table.column("item_id").to_pylist(),
        micros_column(table, "timestamp"),
        table.column("extra").to_pylist(),
        table.column("label_click").to_pylist(),
        table.column("label_purchase").to_pylist(),
    ))
    assert actual_rows == expected_rows
    assert manifest["impressions"]["dropped"] == {r: impression_outcomes.get(r, 0) for r in label_join.IMPRESSION_DROP_REASONS}
    assert manifest["impressions"]["held_back"] == {"open_window": impression_outcomes.get("open_window", 0)}
    assert manifest["events"]["dropped"] == {r: event_outcomes.get(r, 0) for r in label_join.EVENT_DROP_REASONS}
    assert manifest["events"]["attributed"] == event_outcomes.get("attributed", 0)
    assert manifest["events"]["attributed_to_held_back"] == event_outcomes.get("attributed_to_held_back", 0)


# --- downsampling ------------------------------------------------------------

rates = st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0])


@st.composite
def downsample_cases(draw):
    rows = draw(st.integers(2, 40))
    ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=rows, max_size=rows, unique=True))
    minutes = draw(st.lists(st.integers(0, 5 * 24 * 60), min_size=rows, max_size=rows))
    clicks = draw(st.lists(st.sampled_from([0, 0, 1]), min_size=rows, max_size=rows))
    purchases = draw(st.lists(st.sampled_from([0, 0, 0, 1]), min_size=rows, max_size=rows))
    surfaces = draw(st.lists(st.sampled_from(["feed", "search", None]), min_size=rows, max_size=rows))
    stratum_column = draw(st.sampled_from([None, "surface"]))
    keep_rates = {}
    if draw(st.booleans()):
        keep_rates["negative"] = draw(rates)
    if draw(st.booleans()):
        keep_rates["click"] = draw(rates)
    if stratum_column and draw(st.booleans()):
        keep_rates["feed/negative"] = draw(rates)
    use_start = draw(st.booleans())
    setting = DownsampleSettings(
        seed=draw(st.integers(0, 2**31)),
        eval_days=None if use_start else draw(st.sampled_from([0.5, 1.0, 2.0])),
        eval_start_us=T0_US + draw(st.integers(0, 5 * 24)) * 60 * MINUTE_US if use_start else None,
        keep_rates=keep_rates,
        keep_positives=draw(st.booleans()),
        target_negative_ratio=draw(st.sampled_from([None, 0.5, 1.0, 3.0])),
        stratum_column=stratum_column,
    )
    table = {
        "impression_id": ids,
        "t": [T0_US + m * MINUTE_US for m in minutes],
        "surface": surfaces,
        "label_click": clicks,
        "label_purchase": purchases,
    }
    return table, setting


def downsample_config(setting: DownsampleSettings):
    data = copy.deepcopy(CONFIG)
    if setting.eval_start_us is not None:
        data["split"] = {"eval_start": micros_to_datetime(setting.eval_start_us).isoformat()}
    else:
        data["split"] = {"eval_days": setting.eval_days}
    data["downsampling"] = {
        "seed": setting.seed,
        "keep_rates": setting.keep_rates,
        "keep_positives": setting.keep_positives,
    }
    if setting.target_negative_ratio is not None:
        data["downsampling"]["target_negative_ratio"] = setting.target_negative_ratio
    if setting.stratum_column is not None:
        data["downsampling"]["stratum_column"] = setting.stratum_column
    return config_from_dict(data)


def split_rows(path: Path) -> list[tuple]:
    table = pq.read_table(path)
    return sorted(zip(*(table.column(c).to_pylist() for c in ("impression_id", "stratum", "keep_rate", "weight"))))


@SETTINGS
@given(case=downsample_cases())
def test_downsample_matches_reference(spark, tmp_path_factory, case):
    columns, setting = case
    folder = tmp_path_factory.mktemp("downsample")
    (folder / "labelled").mkdir()
    pq.write_table(
        pa.table({
            "impression_id": pa.array(columns["impression_id"], pa.int64()),
            "timestamp": pa.array(columns["t"], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "item_id": pa.array(columns["impression_id"], pa.int64()),
            "surface": pa.array(columns["surface"], pa.string()),
            "label_click": pa.array(columns["label_click"], pa.int8()),
            "label_purchase": pa.array(columns["label_purchase"], pa.int8()),
        }),
        folder / "labelled" / "part-0.parquet",
    )

    con = duckdb.connect()
    reference_input = pa.table({
        **{k: pa.array(v) for k, v in columns.items()},
        "keep_draw": pa.array(duckdb_jobs.keep_uniform(np.array(columns["impression_id"]), setting.seed)),
    })
    con.register("labelled_in", reference_input)
    out = folder / "out"
    run = lambda: downsample.run_downsample(spark, downsample_config(setting), str(folder / "labelled"), str(out))  # noqa: E731
    try:
        expected_rates = duckdb_jobs.downsample(con, "labelled_in", ACTIONS, setting)
    except ReferenceRejects:
        with pytest.raises((ConfigError, EmptyOutputError)):
            run()
        return

    manifest = run()

    assert split_rows(out / "train") == sorted(con.execute("SELECT * FROM ref_train").fetchall())
    assert split_rows(out / "eval") == sorted(con.execute("SELECT * FROM ref_eval").fetchall())
    assert {s: v["keep_rate"] for s, v in manifest["strata"].items()} == expected_rates
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest


def test_keep_uniform_equals_spark_xxhash64(spark):
    ids = [0, 1, -1, 2**62, -(2**63), 123456789]
    frame = spark.createDataFrame([(i,) for i in ids], "impression_id bigint")

    rows = frame.select("impression_id", downsample.keep_uniform(frame["impression_id"], 17).alias("u")).collect()

    expected = duckdb_jobs.keep_uniform(np.array(ids), 17)
    assert {row["impression_id"]: row["u"] for row in rows} == dict(zip(ids, expected.tolist()))


def test_reference_label_join_known_log():
    """The reference itself reproduces a few hand-checked answers, so both sides are not wrong in the same way."""
    con = duckdb.connect()
    con.register("imps", pa.table({
        "impression_id": pa.array([1, 2, 2, 3], pa.int64()),
        "user_id": pa.array([1, 1, 1, None], pa.int64()),
        "item_id": pa.array([1, 1, 1, 1], pa.int64()),
        "t": pa.array([0, 10 * MINUTE_US, 20 * MINUTE_US, 0], pa.int64()),
        "extra": pa.array([0, 0, 0, 0], pa.int64()),
    }))
    con.register("evs", pa.table({
        "user_id": pa.array([1, 1, 1], pa.int64()),
        "item_id": pa.array([1, 1, 1], pa.int64()),
        "action": pa.array(["click", "click", "purchase"]),
        "t": pa.array([15 * MINUTE_US, 15 * MINUTE_US, 100 * MINUTE_US], pa.int64()),
        "impression_id": pa.array([None, None, None], pa.int64()),
    }))

    duckdb_jobs.label_join(con, "imps", "evs", ACTIONS, 200 * MINUTE_US, tie_columns=["extra"])

    labels = dict(con.execute("SELECT impression_id, label_click FROM ref_labelled").fetchall())
    outcomes = sorted(itertools.chain.from_iterable(con.execute("SELECT outcome FROM ref_events").fetchall()))
    assert labels == {1: 0, 2: 1}
    assert outcomes == ["attributed", "duplicate", "outside_window"]
