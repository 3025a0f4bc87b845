"""Label join on a hand-built log whose every label and count is known."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import label_join
from spark_jobs.common import MANIFEST_NAME, datetime_to_micros
from valuerank.config import config_from_dict

T0 = datetime(2022, 4, 20, tzinfo=timezone.utc)
AS_OF = T0 + timedelta(hours=3)

CONFIG = {
    "actions": [
        {"name": "click", "attribution_window": "1h"},
        {"name": "purchase", "attribution_window": "2h"},
    ],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "columns": {"timestamp_unit": "ms"},
    "split": {"eval_days": 1.0},
}

CONFIG_TOML = """
[[actions]]
name = "click"
attribution_window = "1h"

[[actions]]
name = "purchase"
attribution_window = "2h"

[[sparse_features]]
name = "item"
column = "item_id"
num_embeddings = 100

[columns]
timestamp_unit = "ms"

[split]
eval_days = 1.0
"""


def at(**offset: float) -> datetime:
    return T0 + timedelta(**offset)


def epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else datetime_to_micros(moment) // 1000


def make_config():
    return config_from_dict(copy.deepcopy(CONFIG))


# impression_id, user_id, item_id, timestamp, position, surface
IMPRESSIONS = [
    (1, 1, 1, at(), 0, "feed"),  # click exactly at the end of its 1h window
    (2, 2, 2, at(), 0, "feed"),  # click 1 s after the window end, and purchase by impression id at the window end
    (3, 3, 3, at(minutes=10), 0, "feed"),  # click before the impression, and purchase by impression id 1 s too late
    (4, 4, 4, at(), 0, "feed"),  # three copies of one purchase event
    (5, 5, 5, at(), 0, "feed"),  # same user and item shown twice: the later impression 6 gets the click
    (6, 5, 5, at(minutes=20), 1, "feed"),
    (7, 7, 7, at(), 0, "feed"),  # purchase event with NULL user and item but this impression id
    (8, None, 8, at(), 0, "feed"),  # NULL user: dropped
    (9, 9, 9, at(), 0, "feed"),  # duplicate impression id: the earliest row is kept
    (9, 9, 9, at(seconds=1), 0, "search"),
    (10, 10, 10, at(hours=2), 0, "feed"),  # window still open at AS_OF: held back
    (11, 11, 11, at(hours=1), 0, "feed"),  # window closes exactly at AS_OF: labelled
    (12, 12, 12, at(), 0, "feed"),  # two impressions at the same time: the larger id 13 gets the click
    (13, 12, 12, at(), 1, "feed"),
]

# user_id, item_id, action, timestamp, impression_id
EVENTS = [
    (1, 1, "click", at(hours=1), None),  # attributed to 1 (window end)
    (2, 2, "click", at(hours=1, seconds=1), None),  # outside_window
    (3, 3, "click", at(minutes=5), None),  # before_impression
    (4, 4, "purchase", at(minutes=30), None),  # attributed to 4
    (4, 4, "purchase", at(minutes=30), None),  # duplicate
    (4, 4, "purchase", at(minutes=30), None),  # duplicate
    (5, 5, "click", at(minutes=30), None),  # attributed to 6
    (None, None, "purchase", at(minutes=90), 7),  # attributed to 7 by impression id
    (1, 1, "click", at(minutes=10), 999),  # unknown_impression_id, no fallback to user and item
    (8, 8, "click", at(minutes=5), 8),  # impression_dropped
    (None, 1, "click", at(), None),  # null_user_id
    (1, 1, "share", at(minutes=1), None),  # unknown_action
    (10, 10, "click", at(hours=2, minutes=10), None),  # attributed_to_held_back (impression 10)
    (12, 12, "click", at(minutes=1), None),  # attributed to 13
    (99, 99, "click", at(), None),  # no_impression
    (1, 1, "click", None, None),  # null_timestamp
    (1, 1, None, at(), None),  # null_action
    (2, 2, "purchase", at(hours=2), 2),  # attributed to 2 by impression id, at the window end
    (3, 3, "purchase", at(hours=2, minutes=10, seconds=1), 3),  # outside_window by impression id
]

# impression_id: (label_click, label_purchase) with as_of = AS_OF
EXPECTED_LABELS = {
    1: (1, 0),
    2: (0, 1),
    3: (0, 0),
    4: (0, 1),
    5: (0, 0),
    6: (1, 0),
    7: (0, 1),
    9: (0, 0),
    11: (0, 0),
    12: (0, 0),
    13: (1, 0),
}


def impressions_table(rows=IMPRESSIONS, id_type=pa.int64()) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table(
        {
            "impression_id": pa.array(columns[0], id_type),
            "user_id": pa.array(columns[1], id_type),
            "item_id": pa.array(columns[2], id_type),
            "timestamp": pa.array(columns[3], pa.timestamp("us", tz="UTC")),
            "position": pa.array(columns[4], pa.int32()),
            "surface": pa.array(columns[5], pa.string()),
        }
    )


def events_table(rows=EVENTS, id_type=pa.int64()) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table(
        {
            "user_id": pa.array(columns[0], id_type),
            "item_id": pa.array(columns[1], id_type),
            "action": pa.array(columns[2], pa.string()),
            "timestamp": pa.array([epoch_ms(t) for t in columns[3]], pa.int64()),
            "impression_id": pa.array(columns[4], id_type),
        }
    )


def write_log(folder: Path) -> tuple[Path, Path]:
    """Write the hand-built log, impressions as two files of one folder, events as one file."""
    impressions = impressions_table()
    (folder / "impressions").mkdir(parents=True)
    pq.write_table(impressions.slice(0, 7), folder / "impressions" / "part-0.parquet")
    pq.write_table(impressions.slice(7), folder / "impressions" / "part-1.parquet")
    pq.write_table(events_table(), folder / "events.parquet")
    return folder / "impressions", folder / "events.parquet"


def read_rows(path: Path) -> dict[int, dict]:
    """Read a labelled output folder with pyarrow, keyed by impression id."""
    return {row["impression_id"]: row for row in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def joined(spark, tmp_path_factory):
    """Run the label join once on the hand-built log with as_of = AS_OF."""
    folder = tmp_path_factory.mktemp("label_join")
    impressions, events = write_log(folder)
    out = folder / "labelled"
    manifest = label_join.run_label_join(spark, make_config(), str(impressions), str(events), str(out), as_of=AS_OF)
    return manifest, read_rows(out), out


def test_labels_match_known_answers(joined):
    _, rows, _ = joined
    labels = {i: (row["label_click"], row["label_purchase"]) for i, row in rows.items()}
    assert labels == EXPECTED_LABELS


def test_event_at_window_end_counts(joined):
    _, rows, _ = joined
    assert rows[1]["label_click"] == 1


def test_event_after_window_end_ignored(joined):
    _, rows, _ = joined
    assert rows[2]["label_click"] == 0


def test_event_before_impression_ignored(joined):
    _, rows, _ = joined
    assert rows[3]["label_click"] == 0


def test_latest_earlier_impression_wins(joined):
    _, rows, _ = joined
    assert rows[6]["label_click"] == 1
    assert rows[5]["label_click"] == 0


def test_same_time_tie_goes_to_larger_id(joined):
    _, rows, _ = joined
    assert rows[13]["label_click"] == 1
    assert rows[12]["label_click"] == 0


def test_event_with_impression_id_attributed(joined):
    _, rows, _ = joined
    assert rows[7]["label_purchase"] == 1
    assert rows[2]["label_purchase"] == 1


def test_duplicate_impression_keeps_earliest(joined):
    _, rows, _ = joined
    assert rows[9]["timestamp"] == T0
    assert rows[9]["surface"] == "feed"


def test_dropped_and_held_impressions_absent(joined):
    _, rows, _ = joined
    assert 8 not in rows
    assert 10 not in rows
    assert 11 in rows


def test_impression_manifest_counts(joined):
    manifest, _, _ = joined
    assert manifest["impressions"] == {
        "rows_in": 14,
        "rows_out": 11,
        "dropped": {
            "null_impression_id": 0,
            "null_user_id": 1,
            "null_item_id": 0,
            "null_timestamp": 0,
            "duplicate_impression_id": 1,
        },
        "held_back": {"open_window": 1},
    }


def test_event_manifest_counts(joined):
    manifest, _, _ = joined
    assert manifest["events"] == {
        "rows_in": 19,
        "attributed": 6,
        "attributed_to_held_back": 1,
        "dropped": {
            "null_action": 1,
            "null_timestamp": 1,
            "null_user_id": 1,
            "null_item_id": 0,
            "unknown_action": 1,
            "duplicate": 2,
            "unknown_impression_id": 1,
            "impression_dropped": 1,
            "before_impression": 1,
            "outside_window": 2,
            "no_impression": 1,
        },
    }


def test_manifest_positives_and_as_of(joined):
    manifest, _, _ = joined
    assert manifest["positives"] == {"click": 3, "purchase": 3}
    assert manifest["as_of"] == "2022-04-20T03:00:00Z"
    assert manifest["as_of_source"] == "argument"


def test_accounting_invariants_hold(joined):
    manifest, _, _ = joined
    impressions = manifest["impressions"]
    events = manifest["events"]
    impression_total = impressions["rows_out"] + sum(impressions["dropped"].values()) + sum(impressions["held_back"].values())
    event_total = events["attributed"] + events["attributed_to_held_back"] + sum(events["dropped"].values())
    assert impressions["rows_in"] == impression_total
    assert events["rows_in"] == event_total


def test_manifest_file_matches_returned(joined):
    manifest, _, out = joined
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest


def test_output_schema_follows_contract(joined):
    _, _, out = joined
    schema = pq.read_schema(next(out.glob("dt=*/part-*.parquet")))
    assert schema.names == [
        "impression_id", "user_id", "item_id", "timestamp", "position", "surface", "label_click", "label_purchase",
    ]
    for name in ("impression_id", "user_id", "item_id", "position"):
        assert schema.field(name).type == pa.int64(), name
    assert schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("surface").type == pa.string()
    assert schema.field("label_click").type == pa.int8()
    assert schema.field("label_purchase").type == pa.int8()


def test_attribute_events_dataframe_outcomes(spark):
    cfg = make_config()
    impressions = spark.createDataFrame(
        [(1, 1, 1, T0), (2, 1, 1, at(minutes=30))],
        "impression_id bigint, user_id bigint, item_id bigint, timestamp timestamp",
    )
    events = spark.createDataFrame(
        [(1, 1, "click", at(minutes=40), None), (1, 1, "purchase", at(minutes=-1), None)],
        "user_id bigint, item_id bigint, action string, timestamp timestamp, impression_id bigint",
    )

    marked = label_join.mark_impressions(impressions, cfg, as_of_us=None)
    rows = {row["action"]: row for row in label_join.attribute_events(marked, events, cfg).collect()}

    assert rows["click"][label_join.ATTRIBUTED_IMPRESSION_ID] == 2
    assert rows["click"][label_join.OUTCOME] == "attributed"
    assert rows["purchase"][label_join.OUTCOME] == "before_impression"


def test_main_uses_latest_event_as_of(spark, tmp_path):
    impressions, events = write_log(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TOML)
    out = tmp_path / "labelled"

    status = label_join.main(
        ["--config", str(config), "--impressions", str(impressions), "--events", str(events), "--out", str(out)]
    )

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    rows = read_rows(out)
    assert status == 0
    assert manifest["as_of"] == "2022-04-20T02:10:01Z"
    assert manifest["as_of_source"] == "max_event_timestamp"
    assert manifest["impressions"]["held_back"] == {"open_window": 3}
    assert manifest["impressions"]["rows_out"] == 9
    assert sorted(rows) == [1, 2, 3, 4, 5, 7, 9, 12, 13]
    assert manifest["events"]["attributed"] == 5
    assert manifest["events"]["attributed_to_held_back"] == 2
    assert manifest["positives"] == {"click": 2, "purchase": 3}
    assert spark.range(1).count() == 1, "main() stopped a session that it did not start"


def test_int32_and_int64_ids_widened(spark, tmp_path):
    big_user, big_item, big_impression = 5_000_000_000, 7_000_000_000, 3_000_000_000
    small = pa.table(
        {
            "impression_id": pa.array([1, 2], pa.int32()),
            "user_id": pa.array([1, 2], pa.int32()),
            "item_id": pa.array([1, 2], pa.int32()),
            "timestamp": pa.array([epoch_ms(T0)] * 2, pa.int64()),
        }
    )
    large = pa.table(
        {
            "impression_id": pa.array([big_impression, 4], pa.int64()),
            "user_id": pa.array([big_user, 1], pa.int64()),
            "item_id": pa.array([big_item, 2], pa.int64()),
            "timestamp": pa.array([T0, T0], pa.timestamp("ms", tz="UTC")),
        }
    )
    small_events = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int32()),
            "item_id": pa.array([1, 2], pa.int32()),
            "action": ["click", "click"],
            "timestamp": pa.array([epoch_ms(at(minutes=1))] * 2, pa.int64()),
            "impression_id": pa.array([None, 2], pa.int32()),
        }
    )
    large_events = pa.table(
        {
            "user_id": pa.array([big_user], pa.int64()),
            "item_id": pa.array([big_item], pa.int64()),
            "action": ["click"],
            "timestamp": pa.array([epoch_ms(at(minutes=2))], pa.int64()),
        }
    )
    for folder, tables in (("impressions", (small, large)), ("events", (small_events, large_events))):
        (tmp_path / folder).mkdir()
        for i, table in enumerate(tables):
            pq.write_table(table, tmp_path / folder / f"part-{i}.parquet")
    out = tmp_path / "labelled"

    manifest = label_join.run_label_join(
        spark, make_config(), str(tmp_path / "impressions"), str(tmp_path / "events"), str(out), as_of=at(days=1),
        allow_absent_actions=True,
    )

    rows = read_rows(out)
    assert {i: row["label_click"] for i, row in rows.items()} == {1: 1, 2: 1, big_impression: 1, 4: 0}
    assert rows[big_impression]["user_id"] == big_user
    assert pq.read_schema(next(out.glob("dt=*/part-*.parquet"))).field("impression_id").type == pa.int64()
    assert manifest["events"]["attributed"] == 3
