"""Time split and stratified downsampling on generated labelled data."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import downsample
from spark_jobs.common import MANIFEST_NAME
from valuerank.config import config_from_dict

T0 = datetime(2022, 4, 20, tzinfo=timezone.utc)
ROWS = 4000
SPAN = timedelta(days=10)
NEGATIVE_KEEP_RATE = 0.2

CONFIG = {
    "actions": [
        {"name": "click", "attribution_window": "1h"},
        {"name": "purchase", "attribution_window": "1d"},
    ],
    "sparse_features": [{"name": "item", "column": "item_id", "num_embeddings": 100}],
    "split": {"eval_days": 2.0},
    "downsampling": {"seed": 7, "keep_rates": {"negative": NEGATIVE_KEEP_RATE}},
}

CROSSED_TOML = """
[[actions]]
name = "click"
attribution_window = "1h"

[[actions]]
name = "purchase"
attribution_window = "1d"

[[sparse_features]]
name = "item"
column = "item_id"
num_embeddings = 100

[split]
eval_start = "2022-04-28T00:00:00Z"

[downsampling]
seed = 11
stratum_column = "surface"
target_negative_ratio = 2.0
"""


def make_config(**downsampling):
    data = copy.deepcopy(CONFIG)
    data["downsampling"].update(downsampling)
    return config_from_dict(data)


def labelled_table() -> pa.Table:
    """Return ROWS labelled impressions over SPAN: about 15% clicks, 4% purchases, three surfaces."""
    generator = random.Random(5)
    step = SPAN / ROWS
    clicks = [int(generator.random() < 0.15) for _ in range(ROWS)]
    purchases = [int(generator.random() < 0.04) for _ in range(ROWS)]
    surfaces = [generator.choice(["feed", "search", None]) for _ in range(ROWS)]
    return pa.table(
        {
            "impression_id": pa.array(range(1, ROWS + 1), pa.int64()),
            "user_id": pa.array([i % 97 for i in range(ROWS)], pa.int64()),
            "item_id": pa.array([i % 89 for i in range(ROWS)], pa.int64()),
            "timestamp": pa.array([T0 + i * step for i in range(ROWS)], pa.timestamp("us", tz="UTC")),
            "surface": pa.array(surfaces, pa.string()),
            "label_click": pa.array(clicks, pa.int8()),
            "label_purchase": pa.array(purchases, pa.int8()),
        }
    )


def write_files(table: pa.Table, folder: Path, files: int) -> Path:
    """Write ``table`` as ``files`` Parquet files of about equal size, shuffled so each file spans all days."""
    folder.mkdir(parents=True)
    order = list(range(table.num_rows))
    random.Random(files).shuffle(order)
    shuffled = table.take(pa.array(order))
    size = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(shuffled.slice(i * size, size), folder / f"part-{i}.parquet")
    return folder


def read_split(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def output_key(rows: list[dict]) -> set[tuple]:
    return {(row["impression_id"], row["stratum"], row["weight"]) for row in rows}


def pattern(row: dict) -> str:
    positives = [name for name in ("click", "purchase") if row[f"label_{name}"] == 1]
    return "+".join(positives) or "negative"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The generated table and its eval start (the newest timestamp minus two days)."""
    table = labelled_table()
    newest = table.column("timestamp")[-1].as_py()
    return table, newest - timedelta(days=2), tmp_path_factory.mktemp("downsample")


@pytest.fixture(scope="module")
def sampled(spark, source):
    """Run the job once on the table written as one file."""
    table, _, folder = source
    labelled = write_files(table, folder / "labelled-1", files=1)
    out = folder / "out-1"
    manifest = downsample.run_downsample(spark, make_config(), str(labelled), str(out))
    return manifest, out


def test_same_output_for_any_file_count_and_rerun(spark, source, sampled):
    table, _, folder = source
    _, base_out = sampled
    expected_train = output_key(read_split(base_out, "train"))
    expected_eval = output_key(read_split(base_out, "eval"))

    runs = {}
    for files in (3, 8):
        labelled = write_files(table, folder / f"labelled-{files}", files=files)
        runs[f"{files} files"] = folder / f"out-{files}"
        downsample.run_downsample(spark, make_config(), str(labelled), str(runs[f"{files} files"]))
    runs["rerun"] = folder / "out-rerun"
    downsample.run_downsample(spark, make_config(), str(folder / "labelled-1"), str(runs["rerun"]))

    for name, out in runs.items():
        assert output_key(read_split(out, "train")) == expected_train, name
        assert output_key(read_split(out, "eval")) == expected_eval, name


def test_decide_keep_same_for_any_partitioning(spark, source):
    table, _, folder = source
    frame = downsample.add_strata(spark.read.parquet(str(write_files(table, folder / "frame", files=1))), make_config())
    rates = {"negative": 0.3, "click": 0.5, "purchase": 1.0, "click+purchase": 1.0}

    kept = {}
    for partitions in (1, 3, 8):
        repartitioned = frame.repartition(partitions)
        assert repartitioned.rdd.getNumPartitions() == partitions
        rows = downsample.downsample(repartitioned, rates, seed=3).select("impression_id", "weight").collect()
        kept[partitions] = {(row["impression_id"], row["weight"]) for row in rows}

    assert kept[3] == kept[1]
    assert kept[8] == kept[1]


def test_all_positives_kept(source, sampled):
    table, eval_start, _ = source
    _, out = sampled
    train_input = [row for row in table.to_pylist() if row["timestamp"] < eval_start]
    expected = {row["impression_id"] for row in train_input if pattern(row) != "negative"}
    kept = {row["impression_id"] for row in read_split(out, "train") if pattern(row) != "negative"}
    assert kept == expected


def test_weights_are_inverse_keep_rate(sampled):
    _, out = sampled
    for row in read_split(out, "train"):
        assert row["weight"] == 1.0 / row["keep_rate"], row["impression_id"]


def test_negative_keep_rate_and_weight(sampled):
    _, out = sampled
    negatives = [row for row in read_split(out, "train") if row["stratum"] == "negative"]
    assert {row["keep_rate"] for row in negatives} == {NEGATIVE_KEEP_RATE}
    assert {row["weight"] for row in negatives} == {1.0 / NEGATIVE_KEEP_RATE}


def test_negative_kept_share_near_keep_rate(sampled):
    manifest, _ = sampled
    negative = manifest["strata"]["negative"]
    share = negative["rows_after"] / negative["rows_before"]
    assert abs(share - NEGATIVE_KEEP_RATE) < 0.04


def test_eval_split_untouched(source, sampled):
    table, eval_start, _ = source
    _, out = sampled
    expected = {row["impression_id"] for row in table.to_pylist() if row["timestamp"] >= eval_start}
    eval_rows = read_split(out, "eval")
    assert {row["impression_id"] for row in eval_rows} == expected
    assert len(eval_rows) == len(expected)
    assert {row["weight"] for row in eval_rows} == {1.0}
    assert {row["keep_rate"] for row in eval_rows} == {1.0}


def test_strata_match_labels(sampled):
    _, out = sampled
    for split in ("train", "eval"):
        for row in read_split(out, split):
            assert row["stratum"] == pattern(row), (split, row["impression_id"])


def test_split_uses_eval_days(source, sampled):
    _, eval_start, _ = source
    manifest, _ = sampled
    assert manifest["split"]["eval_start"] == eval_start.isoformat().replace("+00:00", "Z")
    assert manifest["split"]["eval_start_source"] == "split.eval_days"


def test_manifest_counts_match_files(sampled):
    manifest, out = sampled
    train = read_split(out, "train")
    eval_rows = read_split(out, "eval")
    assert manifest["rows_in"] == ROWS
    assert manifest["train"]["rows_out"] == len(train)
    assert manifest["eval"]["rows_out"] == len(eval_rows)
    assert manifest["eval"]["rows_in"] == len(eval_rows)
    assert manifest["rows_in"] == manifest["train"]["rows_in"] + manifest["eval"]["rows_in"]
    assert manifest["train"]["rows_in"] == manifest["train"]["rows_out"] + manifest["train"]["dropped"]["downsampled"]
    written = Counter(row["stratum"] for row in train)
    assert {name: stratum["rows_after"] for name, stratum in manifest["strata"].items()} == written


def test_manifest_file_matches_returned(sampled):
    manifest, out = sampled
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest


def test_action_keep_rates_match_files(source, sampled):
    table, eval_start, _ = source
    manifest, out = sampled
    train_input = [row for row in table.to_pylist() if row["timestamp"] < eval_start]
    train = read_split(out, "train")
    click_negatives_before = sum(1 for row in train_input if row["label_click"] == 0)
    click_negatives_after = sum(1 for row in train if row["label_click"] == 0)
    rates = manifest["action_keep_rates"]["click"]["__all__"]
    assert rates["positive"] == 1.0
    assert rates["negative"] == click_negatives_after / click_negatives_before


def test_label_pattern_order(spark):
    frame = spark.createDataFrame(
        [(1, 0, 0), (2, 1, 0), (3, 0, 1), (4, 1, 1)], "impression_id bigint, label_click int, label_purchase int"
    )
    rows = downsample.add_strata(frame, make_config()).collect()
    strata = {row["impression_id"]: row["stratum"] for row in rows}
    assert strata == {1: "negative", 2: "click", 3: "purchase", 4: "click+purchase"}


def test_full_stratum_name_beats_pattern():
    cfg = make_config(stratum_column="surface", keep_rates={"negative": 0.5, "feed/negative": 0.25})
    counts = {"feed/negative": 100, "search/negative": 100, "feed/click": 10}
    rates = downsample.derive_keep_rates(counts, cfg)
    assert rates["feed/negative"].rate == 0.25
    assert rates["search/negative"].rate == 0.5
    assert rates["feed/click"].rate == 1.0
    assert rates["feed/click"].rule == "keep_positives"


def test_target_ratio_counts_per_value():
    cfg = make_config(stratum_column="surface", keep_rates={}, target_negative_ratio=2.0)
    counts = {"feed/negative": 100, "feed/click": 10, "feed/click+purchase": 5, "search/negative": 20, "search/click": 30}
    rates = downsample.derive_keep_rates(counts, cfg)
    assert rates["feed/negative"].rate == pytest.approx(0.3)
    assert rates["search/negative"].rate == 1.0
    assert rates["search/negative"].rule == "target_negative_ratio"


def test_main_crosses_stratum_column_with_target_ratio(spark, source):
    table, _, folder = source
    labelled = write_files(table, folder / "labelled-crossed", files=2)
    config = folder / "crossed.toml"
    config.write_text(CROSSED_TOML)
    out = folder / "out-crossed"

    status = downsample.main(["--config", str(config), "--labelled", str(labelled), "--out", str(out)])

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    train = read_split(out, "train")
    assert status == 0
    assert manifest["split"]["eval_start"] == "2022-04-28T00:00:00Z"
    assert manifest["split"]["eval_start_source"] == "split.eval_start"
    assert {"feed/negative", "search/negative", "__null__/negative", "feed/click"} <= set(manifest["strata"])
    assert set(manifest["action_keep_rates"]["click"]) == {"feed", "search", "__null__"}
    for value in ("feed", "search", "__null__"):
        rows = [row for row in train if row["stratum"].startswith(f"{value}/")]
        negatives = sum(1 for row in rows if row["stratum"] == f"{value}/negative")
        positives = len(rows) - negatives
        assert negatives / positives == pytest.approx(2.0, rel=0.15), value
        assert manifest["strata"][f"{value}/negative"]["rule"] == "target_negative_ratio", value
    for row in train:
        value = row["surface"] if row["surface"] is not None else "__null__"
        assert row["stratum"] == f"{value}/{pattern(row)}", row["impression_id"]
    assert {row["weight"] for row in read_split(out, "eval")} == {1.0}


def test_keeping_no_training_rows_rejected(spark, tmp_path):
    rows = 8
    table = pa.table(
        {
            "impression_id": pa.array([0, 4, -3, 3, -2, 2, -1, 1], pa.int64()),
            "item_id": pa.array([1] * rows, pa.int64()),
            "timestamp": pa.array([T0] * (rows - 1) + [T0 + timedelta(hours=12, minutes=1)], pa.timestamp("us", tz="UTC")),
            "label_click": pa.array([0] * rows, pa.int8()),
            "label_purchase": pa.array([0] * rows, pa.int8()),
        }
    )
    labelled = write_files(table, tmp_path / "labelled", files=1)
    data = copy.deepcopy(CONFIG)
    data["split"] = {"eval_days": 0.5}
    data["downsampling"] = {"seed": 1, "keep_rates": {"negative": 0.1}}
    cfg = config_from_dict(data)

    with pytest.raises(downsample.EmptyOutputError) as error:
        downsample.run_downsample(spark, cfg, str(labelled), str(tmp_path / "out"))

    assert "downsampling keeps none of the 7 training rows" in str(error.value)
    assert not (tmp_path / "out").exists()
