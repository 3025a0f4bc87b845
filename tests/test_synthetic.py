"""Tests of valuerank.synthetic on real Parquet output.

The fixture attributes the events back to impressions with pandas (by impression_id
where the event has one, else by user and item) and derives labels from the events
that fall inside the attribution window, independently of the generator's own counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from valuerank.config import load_config
from valuerank.synthetic import ACTIONS, ATTRIBUTION_WINDOW_SECONDS, UNKNOWN_ACTION, TargetRates, generate

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
NUM_IMPRESSIONS = 100_000


def _attribute(impressions: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Return one row per (event, impression) match with the delay and whether it is in the window."""
    events = events.reset_index(names="event_row")
    known = events[events["action"].isin(ACTIONS)]

    with_id = known[known["impression_id"].notna()].astype({"impression_id": "int64"})
    by_id = with_id.merge(
        impressions[["impression_id", "timestamp"]], on="impression_id", suffixes=("", "_impression")
    )
    by_pair = known[known["impression_id"].isna()].drop(columns="impression_id").merge(
        impressions[["impression_id", "user_id", "item_id", "timestamp"]],
        on=["user_id", "item_id"],
        suffixes=("", "_impression"),
    )
    matched = pd.concat([by_id, by_pair], ignore_index=True)

    matched["delay_s"] = (matched["timestamp"] - matched["timestamp_impression"]).dt.total_seconds()
    window_s = matched["action"].map(ATTRIBUTION_WINDOW_SECONDS)
    matched["in_window"] = (matched["delay_s"] >= 0) & (matched["delay_s"] <= window_s)
    return matched


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate(out, num_impressions=NUM_IMPRESSIONS, seed=1)
    impressions = pq.read_table(out / "impressions").to_pandas()
    events = pq.read_table(out / "events").to_pandas()
    matched = _attribute(impressions, events)

    # Impressions whose windows all close before the log ends have complete labels.
    log_end = pd.Timestamp(summary["log_end"])
    max_window = pd.Timedelta(seconds=max(ATTRIBUTION_WINDOW_SECONDS.values()))
    closed = impressions[impressions["timestamp"] + max_window <= log_end]
    positives = {}
    for action in ACTIONS:
        hits = matched[(matched["action"] == action) & matched["in_window"]]
        positives[action] = set(hits["impression_id"]) & set(closed["impression_id"])

    return SimpleNamespace(
        out=out,
        summary=summary,
        impressions=impressions,
        events=events,
        matched=matched,
        closed=closed,
        positives=positives,
    )


def _rate(log, action: str) -> float:
    return len(log.positives[action]) / len(log.closed)


# Determinism.


def test_same_seed_same_impressions(tmp_path):
    generate(tmp_path / "a", num_impressions=5000, seed=3)
    generate(tmp_path / "b", num_impressions=5000, seed=3)
    first = pq.read_table(tmp_path / "a" / "impressions")
    second = pq.read_table(tmp_path / "b" / "impressions")
    assert first.equals(second)


def test_same_seed_same_events(tmp_path):
    generate(tmp_path / "a", num_impressions=5000, seed=3)
    generate(tmp_path / "b", num_impressions=5000, seed=3)
    first = pq.read_table(tmp_path / "a" / "events")
    second = pq.read_table(tmp_path / "b" / "events")
    assert first.equals(second)


def test_same_seed_same_summary(tmp_path):
    first = generate(tmp_path / "a", num_impressions=5000, seed=3)
    second = generate(tmp_path / "b", num_impressions=5000, seed=3)
    first.pop("paths")
    second.pop("paths")
    assert first == second


def test_other_seed_other_impressions(tmp_path):
    generate(tmp_path / "a", num_impressions=5000, seed=3)
    generate(tmp_path / "b", num_impressions=5000, seed=4)
    first = pq.read_table(tmp_path / "a" / "impressions")
    second = pq.read_table(tmp_path / "b" / "impressions")
    assert not first.equals(second)


# Schema.


def test_impression_count(log):
    assert len(log.impressions) == NUM_IMPRESSIONS


def test_impression_ids_unique(log):
    assert log.impressions["impression_id"].is_unique


@pytest.mark.parametrize("log_name", ["impressions", "events"])
def test_timestamp_type_utc_ms(log, log_name):
    schema = pq.read_schema(log.out / log_name / "part-0.parquet")
    assert schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")


@pytest.mark.parametrize("column", ["impression_id", "request_id", "user_id", "item_id", "position"])
def test_impression_id_columns_int64(log, column):
    schema = pq.read_schema(log.out / "impressions" / "part-0.parquet")
    assert schema.field(column).type == pa.int64()


@pytest.mark.parametrize("column", ["impression_id", "user_id", "item_id"])
def test_event_id_columns_int64(log, column):
    schema = pq.read_schema(log.out / "events" / "part-0.parquet")
    assert schema.field(column).type == pa.int64()


@pytest.mark.parametrize("action", ACTIONS)
def test_true_probability_is_float64(log, action):
    schema = pq.read_schema(log.out / "impressions" / "part-0.parquet")
    assert schema.field(f"true_p_{action}").type == pa.float64()


def test_demo_config_columns_present(log):
    cfg = load_config(DEMO_CONFIG)
    needed = [f.column for f in cfg.sparse_features] + [f.column for f in cfg.dense_features]
    needed.append(cfg.downsampling.stratum_column)
    missing = [c for c in needed if c not in log.impressions.columns]
    assert missing == []


def test_demo_config_windows_match_generator():
    cfg = load_config(DEMO_CONFIG)
    assert {a.name: a.window_seconds for a in cfg.actions} == ATTRIBUTION_WINDOW_SECONDS


def test_surface_values(log):
    assert set(log.impressions["surface"]) == {"feed", "search"}


def test_positions_count_up_within_request(log):
    by_request = log.impressions.groupby("request_id")["position"]
    expected = by_request.cumcount() + 1
    assert (log.impressions["position"] == expected).all()


def test_positions_within_slots(log):
    assert log.impressions["position"].between(1, 10).all()


def test_item_price_positive(log):
    assert (log.impressions["item_price"] > 0).all()


def test_impressions_span_two_weeks(log):
    span = log.impressions["timestamp"].max() - log.impressions["timestamp"].min()
    assert pd.Timedelta(days=13) < span <= pd.Timedelta(days=14)


def test_users_see_each_item_once(log):
    repeated = log.impressions.duplicated(["user_id", "item_id"]).sum()
    assert repeated < 0.001 * NUM_IMPRESSIONS


# True probabilities and label rates.


@pytest.mark.parametrize("action", ACTIONS)
def test_true_probability_in_unit_interval(log, action):
    column = log.impressions[f"true_p_{action}"]
    assert column.between(0.0, 1.0).all()


def test_cart_probability_below_click(log):
    frame = log.impressions
    assert (frame["true_p_add_to_cart"] <= frame["true_p_click"]).all()


def test_purchase_probability_below_cart(log):
    frame = log.impressions
    assert (frame["true_p_purchase"] <= frame["true_p_add_to_cart"]).all()


def test_click_rate_realistic(log):
    assert 0.03 <= _rate(log, "click") <= 0.08


def test_add_to_cart_share_of_clicks_realistic(log):
    share = len(log.positives["add_to_cart"]) / len(log.positives["click"])
    assert 0.15 <= share <= 0.25


def test_purchase_share_of_carts_realistic(log):
    share = len(log.positives["purchase"]) / len(log.positives["add_to_cart"])
    assert 0.20 <= share <= 0.40


def test_report_rate_realistic(log):
    assert 0.002 <= _rate(log, "report") <= 0.005


@pytest.mark.parametrize("action", ACTIONS)
def test_true_probabilities_match_positives(log, action):
    # The positives are a sum of independent Bernoulli draws with these probabilities,
    # so they stay within 4 standard deviations of the expected count.
    p = log.closed[f"true_p_{action}"]
    expected = p.sum()
    std = math.sqrt((p * (1 - p)).sum())
    assert abs(len(log.positives[action]) - expected) <= 4 * std


def test_click_probability_falls_with_position(log):
    by_position = log.impressions.groupby("position")["true_p_click"].mean()
    assert by_position.is_monotonic_decreasing


# Events.


def test_every_known_event_matches_an_impression(log):
    known = log.events[log.events["action"].isin(ACTIONS)]
    assert log.matched["event_row"].nunique() == len(known)


def test_events_after_their_impression(log):
    assert (log.matched["delay_s"] > 0).all()


def test_funnel_carts_only_on_clicks(log):
    assert log.positives["add_to_cart"] <= log.positives["click"]


def test_funnel_purchases_only_on_carts(log):
    assert log.positives["purchase"] <= log.positives["add_to_cart"]


def test_funnel_cart_after_click(log):
    first = log.matched[log.matched["in_window"]].groupby(["impression_id", "action"])["timestamp"].min().unstack()
    carted = first[first["add_to_cart"].notna()]
    assert (carted["add_to_cart"] > carted["click"]).all()


def test_funnel_purchase_after_cart(log):
    first = log.matched[log.matched["in_window"]].groupby(["impression_id", "action"])["timestamp"].min().unstack()
    purchased = first[first["purchase"].notna()]
    assert (purchased["purchase"] > purchased["add_to_cart"]).all()


def test_funnel_holds_for_late_events(log):
    late = log.matched[~log.matched["in_window"]]
    carts = set(late.loc[late["action"] == "add_to_cart", "impression_id"])
    clicked = set(log.matched.loc[log.matched["in_window"] & (log.matched["action"] == "click"), "impression_id"])
    assert carts <= clicked


def test_late_events_exist(log):
    assert (~log.matched["in_window"]).sum() > 0


def test_late_events_rare(log):
    assert (~log.matched["in_window"]).sum() < 0.02 * len(log.events)


def test_late_events_after_window(log):
    late = log.matched[~log.matched["in_window"]]
    window_s = late["action"].map(ATTRIBUTION_WINDOW_SECONDS)
    assert (late["delay_s"] > window_s).all()


def test_late_events_do_not_change_labels(log):
    late = log.matched[~log.matched["in_window"]]
    in_window = log.matched[log.matched["in_window"]]
    late_pairs = set(zip(late["impression_id"], late["action"]))
    labelled_pairs = set(zip(in_window["impression_id"], in_window["action"]))
    assert late_pairs.isdisjoint(labelled_pairs)


def test_late_event_count_in_summary(log):
    late = (~log.matched["in_window"]).sum()
    assert late == sum(log.summary["late_events"].values())


def test_duplicate_events_exist(log):
    assert log.events.duplicated().sum() > 0


def test_unknown_action_events_exist(log):
    assert (log.events["action"] == UNKNOWN_ACTION).sum() == log.summary["unknown_action_events"]


def test_some_events_carry_impression_id(log):
    assert log.events["impression_id"].notna().sum() > 0


def test_most_events_lack_impression_id(log):
    assert log.events["impression_id"].isna().mean() > 0.5


def test_events_before_log_end(log):
    assert (log.events["timestamp"] < pd.Timestamp(log.summary["log_end"])).all()


def test_events_sorted_by_time(log):
    assert log.events["timestamp"].is_monotonic_increasing


# Arguments.


def test_windows_must_grow_along_funnel(tmp_path):
    windows = dict(ATTRIBUTION_WINDOW_SECONDS, add_to_cart=ATTRIBUTION_WINDOW_SECONDS["click"])
    with pytest.raises(ValueError, match="grow along the funnel"):
        generate(tmp_path, num_impressions=100, windows=windows)


def test_unreachable_rate_rejected(tmp_path):
    with pytest.raises(ValueError, match="click"):
        generate(tmp_path, num_impressions=1000, rates=TargetRates(click=0.99))


def test_output_folder_with_other_files_rejected(tmp_path):
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "part-1.parquet").write_bytes(b"")
    with pytest.raises(FileExistsError, match="part-1.parquet"):
        generate(tmp_path, num_impressions=100)


def test_small_log_generates(tmp_path):
    summary = generate(tmp_path, num_impressions=1, seed=0)
    assert summary["impressions"] == 1


def test_user_ids_in_id_space(log):
    assert log.impressions["user_id"].between(0, 9_999).all()


def test_item_ids_in_id_space(log):
    assert log.impressions["item_id"].between(0, 4_999).all()
