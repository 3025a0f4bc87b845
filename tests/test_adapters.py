"""Tests of the KuaiRand and Open Bandit converters on the real files in ../shared/datasets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from valuerank.adapters import kuairand, open_bandit
from valuerank.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
KUAIRAND_TSV = DATASETS / "kuairand-likehate" / "log.tsv"
OPEN_BANDIT_DIR = DATASETS / "open-bandit-random"

needs_kuairand = pytest.mark.skipif(
    not KUAIRAND_TSV.is_file(),
    reason=f"KuaiRand log not found at {KUAIRAND_TSV}; place kuairand-likehate/log.tsv there to run these tests",
)
needs_open_bandit = pytest.mark.skipif(
    not (OPEN_BANDIT_DIR / "impressions.csv").is_file(),
    reason=f"Open Bandit sample not found in {OPEN_BANDIT_DIR}; place impressions.csv and item_context.csv there",
)

KUAIRAND_SOURCE_FLAGS = {
    "click": "is_click",
    "long_view": "long_view",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "profile_enter": "is_profile_enter",
}


def _read(out: Path, log_name: str) -> pa.Table:
    return pq.read_table(out / log_name / "part-0.parquet")


# KuaiRand.


@pytest.fixture(scope="module")
def kuairand_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("kuairand")
    summary = kuairand.convert(KUAIRAND_TSV, out)
    return SimpleNamespace(
        out=out,
        summary=summary,
        source=pd.read_csv(KUAIRAND_TSV, sep="\t"),
        impressions=_read(out, "impressions"),
        events=_read(out, "events"),
    )


@needs_kuairand
def test_kuairand_row_count(kuairand_log):
    assert kuairand_log.impressions.num_rows == len(kuairand_log.source)


@needs_kuairand
def test_kuairand_impression_ids_are_row_numbers(kuairand_log):
    ids = kuairand_log.impressions["impression_id"].to_pylist()
    assert ids == list(range(len(kuairand_log.source)))


@needs_kuairand
@pytest.mark.parametrize("action", kuairand.ACTIONS)
def test_kuairand_events_per_action(kuairand_log, action):
    source = kuairand_log.source
    if action == "like":
        expected = int((source["label"] == 1).sum())
    elif action == "hate":
        expected = int((source["label"] == 0).sum())
    else:
        expected = int(source[KUAIRAND_SOURCE_FLAGS[action]].sum())
    actions = kuairand_log.events["action"].to_pandas()
    assert int((actions == action).sum()) == expected


@needs_kuairand
def test_kuairand_event_count(kuairand_log):
    assert kuairand_log.events.num_rows == sum(kuairand_log.summary["positives"].values())


@needs_kuairand
@pytest.mark.parametrize("column", ["impression_id", "user_id", "item_id"])
def test_kuairand_impression_ids_int64(kuairand_log, column):
    assert kuairand_log.impressions.schema.field(column).type == pa.int64()


@needs_kuairand
@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_kuairand_event_ids_int64(kuairand_log, column):
    assert kuairand_log.events.schema.field(column).type == pa.int64()


@needs_kuairand
@pytest.mark.parametrize("log_name", ["impressions", "events"])
def test_kuairand_timestamps_utc(kuairand_log, log_name):
    table = getattr(kuairand_log, log_name)
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")


@needs_kuairand
def test_kuairand_timestamps_equal_time_ms(kuairand_log):
    written = kuairand_log.impressions["timestamp"].cast(pa.int64()).to_pylist()
    assert written == kuairand_log.source["time_ms"].tolist()


@needs_kuairand
def test_kuairand_events_lack_impression_id(kuairand_log):
    assert "impression_id" not in kuairand_log.events.column_names


@needs_kuairand
def test_kuairand_item_id_is_video_id(kuairand_log):
    assert kuairand_log.impressions["item_id"].to_pylist() == kuairand_log.source["video_id"].tolist()


@needs_kuairand
def test_kuairand_position_null(kuairand_log):
    assert kuairand_log.impressions["position"].null_count == len(kuairand_log.source)


@needs_kuairand
def test_kuairand_hour_of_day_range(kuairand_log):
    hours = kuairand_log.impressions["hour"].to_pandas()
    assert hours.between(0, 23).all()


@needs_kuairand
def test_kuairand_hour_in_china_standard_time(kuairand_log):
    local = pd.to_datetime(kuairand_log.source["time_ms"], unit="ms", utc=True).dt.tz_convert("Asia/Shanghai")
    assert kuairand_log.impressions["hour"].to_pylist() == local.dt.hour.tolist()


@needs_kuairand
def test_kuairand_duration_passthrough(kuairand_log):
    assert kuairand_log.impressions["duration_ms"].to_pylist() == kuairand_log.source["duration_ms"].tolist()


@needs_kuairand
def test_kuairand_events_inside_config_windows(kuairand_log):
    # Every event must have an impression of the same user and video at or before it,
    # within that action's window in configs/kuairand.toml.
    cfg = load_config(ROOT / "configs" / "kuairand.toml")
    windows = {a.name: pd.Timedelta(seconds=a.window_seconds) for a in cfg.actions}
    events = kuairand_log.events.to_pandas().reset_index(names="event_row")
    impressions = kuairand_log.impressions.select(["user_id", "item_id", "timestamp"]).to_pandas()
    pairs = events.merge(impressions, on=["user_id", "item_id"], suffixes=("", "_impression"))
    delay = pairs["timestamp"] - pairs["timestamp_impression"]
    pairs["attributed"] = (delay >= pd.Timedelta(0)) & (delay <= pairs["action"].map(windows))
    attributed = pairs.groupby("event_row")["attributed"].any()
    assert attributed.reindex(events["event_row"], fill_value=False).all()


@needs_kuairand
def test_kuairand_max_event_delay_is_max_play_time(kuairand_log):
    max_play_ms = max(int(kuairand_log.source["play_time_ms"].max()), 1000)
    assert round(kuairand_log.summary["max_event_delay_seconds"] * 1000) == max_play_ms


@needs_kuairand
def test_kuairand_config_columns_present(kuairand_log):
    cfg = load_config(ROOT / "configs" / "kuairand.toml")
    needed = [f.column for f in cfg.sparse_features] + [f.column for f in cfg.dense_features]
    missing = [c for c in needed if c not in kuairand_log.impressions.column_names]
    assert missing == []


# Open Bandit.


@pytest.fixture(scope="module")
def open_bandit_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("open_bandit")
    summary = open_bandit.convert(OPEN_BANDIT_DIR, out)
    return SimpleNamespace(
        out=out,
        summary=summary,
        source=pd.read_csv(OPEN_BANDIT_DIR / "impressions.csv", index_col=0),
        item_context=pd.read_csv(OPEN_BANDIT_DIR / "item_context.csv", index_col=0),
        impressions=_read(out, "impressions"),
        events=_read(out, "events"),
    )


@needs_open_bandit
def test_open_bandit_row_count(open_bandit_log):
    assert open_bandit_log.impressions.num_rows == len(open_bandit_log.source)


@needs_open_bandit
def test_open_bandit_click_event_count(open_bandit_log):
    assert open_bandit_log.events.num_rows == int(open_bandit_log.source["click"].sum())


@needs_open_bandit
def test_open_bandit_events_are_clicks(open_bandit_log):
    assert set(open_bandit_log.events["action"].to_pylist()) == {"click"}


@needs_open_bandit
def test_open_bandit_events_on_clicked_rows(open_bandit_log):
    clicked = set(np.flatnonzero(open_bandit_log.source["click"].to_numpy() == 1).tolist())
    assert set(open_bandit_log.events["impression_id"].to_pylist()) == clicked


@needs_open_bandit
@pytest.mark.parametrize(
    "column",
    ["impression_id", "user_id", "item_id", "position", "user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3"],
)
def test_open_bandit_impression_ids_int64(open_bandit_log, column):
    assert open_bandit_log.impressions.schema.field(column).type == pa.int64()


@needs_open_bandit
@pytest.mark.parametrize("column", ["impression_id", "user_id", "item_id"])
def test_open_bandit_event_ids_int64(open_bandit_log, column):
    assert open_bandit_log.events.schema.field(column).type == pa.int64()


@needs_open_bandit
@pytest.mark.parametrize("log_name", ["impressions", "events"])
def test_open_bandit_timestamps_utc(open_bandit_log, log_name):
    table = getattr(open_bandit_log, log_name)
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")


@needs_open_bandit
def test_open_bandit_first_timestamp(open_bandit_log):
    first = open_bandit_log.impressions["timestamp"][0].as_py()
    assert first == pd.Timestamp("2019-11-24 00:00:34.762+00:00").to_pydatetime()


@needs_open_bandit
def test_open_bandit_click_one_second_after_impression(open_bandit_log):
    events = open_bandit_log.events.to_pandas()
    impressions = open_bandit_log.impressions.select(["impression_id", "timestamp"]).to_pandas()
    joined = events.merge(impressions, on="impression_id", suffixes=("", "_impression"))
    assert ((joined["timestamp"] - joined["timestamp_impression"]) == pd.Timedelta(seconds=1)).all()


@needs_open_bandit
def test_open_bandit_event_ids_match_impressions(open_bandit_log):
    events = open_bandit_log.events.to_pandas()
    impressions = open_bandit_log.impressions.select(["impression_id", "user_id", "item_id"]).to_pandas()
    joined = events.merge(impressions, on="impression_id", suffixes=("", "_impression"))
    assert (joined["user_id"] == joined["user_id_impression"]).all()


@needs_open_bandit
def test_open_bandit_user_id_per_feature_combination(open_bandit_log):
    features = open_bandit_log.source[[f"user_feature_{i}" for i in range(4)]]
    assert len(set(open_bandit_log.impressions["user_id"].to_pylist())) == len(features.drop_duplicates())


def test_open_bandit_user_id_golden_value():
    # blake2b with an 8-byte digest of "a|b|c|d", read big-endian, top bit cleared.
    assert open_bandit.user_id_of(("a", "b", "c", "d")) == 2452662691105427775


@needs_open_bandit
def test_open_bandit_user_id_stable_across_processes(open_bandit_log):
    features = tuple(open_bandit_log.source[[f"user_feature_{i}" for i in range(4)]].iloc[0])
    code = (
        "import sys; from valuerank.adapters.open_bandit import user_id_of; "
        "print(user_id_of(tuple(sys.argv[1:])))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", code, *features], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert int(result.stdout) == open_bandit_log.impressions["user_id"][0].as_py()


@needs_open_bandit
def test_open_bandit_user_ids_stable_across_runs(open_bandit_log, tmp_path):
    open_bandit.convert(OPEN_BANDIT_DIR, tmp_path)
    again = _read(tmp_path, "impressions")
    assert again["user_id"].equals(open_bandit_log.impressions["user_id"])


@needs_open_bandit
def test_open_bandit_user_ids_non_negative(open_bandit_log):
    assert min(open_bandit_log.impressions["user_id"].to_pylist()) >= 0


@needs_open_bandit
def test_open_bandit_item_feature_joined(open_bandit_log):
    by_item = open_bandit_log.item_context.set_index("item_id")["item_feature_0"]
    expected = open_bandit_log.source["item_id"].map(by_item).tolist()
    assert open_bandit_log.impressions["item_feature_0"].to_pylist() == expected


@needs_open_bandit
def test_open_bandit_propensity_passthrough(open_bandit_log):
    written = open_bandit_log.impressions["propensity_score"].to_pylist()
    assert written == open_bandit_log.source["propensity_score"].tolist()


@needs_open_bandit
def test_open_bandit_obp_wheel_layout(open_bandit_log, tmp_path):
    # The obp wheel stores the sample as obp/dataset/obd/random/all/all.csv.
    folder = tmp_path / "wheel" / "obp" / "dataset" / "obd" / "random" / "all"
    folder.mkdir(parents=True)
    shutil.copy(OPEN_BANDIT_DIR / "impressions.csv", folder / "all.csv")
    shutil.copy(OPEN_BANDIT_DIR / "item_context.csv", folder / "item_context.csv")
    open_bandit.convert(tmp_path / "wheel", tmp_path / "out")
    assert _read(tmp_path / "out", "impressions").equals(open_bandit_log.impressions)


@needs_open_bandit
def test_open_bandit_without_item_context(tmp_path):
    shutil.copy(OPEN_BANDIT_DIR / "impressions.csv", tmp_path / "impressions.csv")
    open_bandit.convert(tmp_path, tmp_path / "out")
    rows = _read(tmp_path / "out", "impressions").num_rows
    assert _read(tmp_path / "out", "impressions")["item_feature_0"].null_count == rows


def test_open_bandit_missing_source_names_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="impressions.csv"):
        open_bandit.convert(tmp_path, tmp_path / "out")


@needs_open_bandit
def test_open_bandit_config_columns_present(open_bandit_log):
    cfg = load_config(ROOT / "configs" / "open_bandit.toml")
    needed = [f.column for f in cfg.sparse_features] + [f.column for f in cfg.dense_features]
    missing = [c for c in needed if c not in open_bandit_log.impressions.column_names]
    assert missing == []


def test_kuairand_missing_source_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="log.tsv"):
        kuairand.convert(tmp_path / "log.tsv", tmp_path / "out")


def test_kuairand_missing_column_named(tmp_path):
    src = tmp_path / "log.tsv"
    src.write_text("user_id\tvideo_id\n1\t2\n")
    with pytest.raises(ValueError, match="missing column 'time_ms'"):
        kuairand.convert(src, tmp_path / "out")
