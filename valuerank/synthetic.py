"""Synthetic impression and event logs with known action probabilities.

``generate`` draws users and items with latent vectors, requests of several
impressions, and for every impression the probability of each action: a funnel
click -> add_to_cart -> purchase with a position bias on the click, and a rare
report that does not depend on the click. The unconditional probabilities are
stored in the impressions as ``true_p_<action>`` (float64). They are functions of
the user, the item and the position only, so a model with the sparse features
user_id and item_id and the dense features position and item_price can learn them.

Labels are drawn from these probabilities and written as action events, which the
label join has to attribute again. Each positive gives one event inside that
action's attribution window. A few extra events must not change any label: exact
duplicates, events after the window (on impressions whose label for that action is
0) and events of an action that no config names ("share"). About one event in five
carries the impression_id. The others must be attributed by user and item, so the
generator redraws repeated (user, item) pairs for up to 10 rounds. Almost no user
then sees the same item twice, and this attribution is unambiguous.

Both logs end at ``start + days``. Events after that time are not in the log, so
the labels of impressions whose windows are still open at the end are incomplete,
and the label join holds those impressions back.

Command::

    python -m valuerank.synthetic --out runs/demo/raw --impressions 200000 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from launch.local import positive_int
from valuerank.adapters import iso_utc, timestamp_array, write_raw_logs
from valuerank.config import parse_utc

logger = logging.getLogger(__name__)

ACTIONS = ("click", "add_to_cart", "purchase", "report")
"""Actions of the synthetic log: the funnel in order, then report."""

UNKNOWN_ACTION = "share"
"""Action of the extra events that no config names; the label join must ignore them."""

ATTRIBUTION_WINDOW_SECONDS = {"click": 3600, "add_to_cart": 86_400, "purchase": 3 * 86_400, "report": 86_400}
"""Default windows, equal to those in configs/demo.toml (tests/test_synthetic.py checks this)."""

LATENT_DIM = 8
ZIPF_EXPONENT = 1.0
POSITION_BIAS_EXPONENT = 0.7
"""The probability of examining position k is k ** -POSITION_BIAS_EXPONENT (1.0 at position 1)."""

SEARCH_SHARE = 0.3
FEED_SLOTS = (5, 10)
SEARCH_SLOTS = (1, 6)
"""Inclusive ranges of the number of impressions in one request, by surface."""

EVENTS_WITH_IMPRESSION_ID = 0.2
"""Share of the events that carry the impression_id; the others have NULL there."""
DUPLICATE_EVENT_RATE = 0.005
"""Share of the positive events that appear twice."""
LATE_EVENT_SHARE = 0.01
"""Late events of an action, as a share of that action's positives (at least one)."""
UNKNOWN_ACTION_RATE = 0.001
"""Events of UNKNOWN_ACTION per impression."""

REPEAT_REDRAW_ROUNDS = 10

MS_PER_SECOND = 1000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
MIN_DELAY_MS = 1000
"""Every event comes at least 1 s after its impression, and a funnel event at least 1 s after the previous step."""

MEAN_DELAY_MS = {
    "click": 20 * MS_PER_SECOND,
    "add_to_cart": 10 * 60 * MS_PER_SECOND,
    "purchase": 6 * MS_PER_HOUR,
    "report": 5 * 60 * MS_PER_SECOND,
    UNKNOWN_ACTION: 60 * MS_PER_SECOND,
}
"""Mean delay before truncation to the window. add_to_cart counts from the click, purchase from the cart."""


@dataclass(frozen=True)
class TargetRates:
    """Mean rates that the generator calibrates the true probabilities to."""

    click: float = 0.05
    """Clicks per impression."""

    add_to_cart_given_click: float = 0.2
    """Add-to-cart events per click."""

    purchase_given_cart: float = 0.3
    """Purchases per add-to-cart."""

    report: float = 0.003
    """Reports per impression, independent of the click."""


@dataclass
class _Catalog:
    """Per-user and per-item parameters; arrays are indexed by user_id or item_id."""

    user_latent: np.ndarray
    user_cart_latent: np.ndarray
    user_activity: np.ndarray
    user_click_bias: np.ndarray
    user_purchase_bias: np.ndarray
    user_report_bias: np.ndarray
    item_latent: np.ndarray
    item_cart_latent: np.ndarray
    item_popularity: np.ndarray
    item_click_bias: np.ndarray
    item_price: np.ndarray
    item_price_score: np.ndarray
    item_report_bias: np.ndarray


@dataclass
class _Impressions:
    """Impressions in time order; index i is impression_id i."""

    request_id: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    timestamp_ms: np.ndarray
    position: np.ndarray
    search: np.ndarray
    repeated: np.ndarray
    """True where another impression has the same (user_id, item_id)."""


@dataclass
class _Events:
    impression: np.ndarray
    """Index of the impression the event belongs to."""

    action: np.ndarray
    """Index into ACTIONS + (UNKNOWN_ACTION,)."""

    timestamp_ms: np.ndarray
    kind: np.ndarray
    """One of the _KIND_* codes, for the summary."""

    has_impression_id: np.ndarray
    """True where the event log carries the impression_id; NULL elsewhere."""

    def select(self, rows: np.ndarray) -> _Events:
        """Return the events at ``rows`` (a mask or an index array)."""
        return _Events(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def append(self, other: _Events) -> _Events:
        """Return these events followed by ``other``."""
        return _Events(
            **{f.name: np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in dataclasses.fields(self)}
        )


_KIND_POSITIVE, _KIND_LATE, _KIND_UNKNOWN, _KIND_DUPLICATE = 0, 1, 2, 3
_EVENT_ACTIONS = (*ACTIONS, UNKNOWN_ACTION)


def generate(
    out_dir: str | Path,
    num_impressions: int = 200_000,
    seed: int = 0,
    *,
    num_users: int = 10_000,
    num_items: int = 5_000,
    days: int = 14,
    start: str = "2024-03-04T00:00:00Z",
    rates: TargetRates = TargetRates(),
    windows: Mapping[str, int] | None = None,
) -> dict:
    """Write a synthetic impression log and event log under ``out_dir`` and return a summary.

    ``windows`` maps each action in ACTIONS to its attribution window in seconds
    (default ATTRIBUTION_WINDOW_SECONDS) and must match the config that labels the
    log. The same arguments give the same files.
    """
    windows = _check_arguments(num_impressions, num_users, num_items, days, windows)
    rng = np.random.default_rng(seed)
    start_ms = int(parse_utc(start, "start").timestamp() * MS_PER_SECOND)
    log_end_ms = start_ms + days * MS_PER_DAY

    # Users, items and impressions.
    catalog = _draw_catalog(rng, num_users, num_items)
    impressions = _draw_impressions(rng, num_impressions, catalog, start_ms, days)

    # True probabilities, then labels drawn from them.
    probabilities = _true_probabilities(catalog, impressions, rates)
    labels = _draw_labels(rng, probabilities)

    # Events: positives, late events and unknown actions, cut at the end of the log.
    events = _draw_events(rng, impressions, labels, windows)
    after_log_end = events.timestamp_ms >= log_end_ms
    events = _add_duplicates(rng, events.select(~after_log_end))
    events = events.select(np.lexsort((events.action, events.impression, events.timestamp_ms)))

    # Write both logs.
    paths = write_raw_logs(
        out_dir,
        _impression_table(impressions, catalog, probabilities),
        _event_table(events, impressions),
    )

    summary = _summary(impressions, probabilities, labels, events, windows, log_end_ms)
    summary["events_after_log_end_dropped"] = int(after_log_end.sum())
    summary["seed"] = seed
    summary["paths"] = paths
    logger.info(
        "generated %d impressions and %d events in %s (seed %d)",
        num_impressions,
        summary["events"],
        out_dir,
        seed,
    )
    return summary


def _check_arguments(
    num_impressions: int, num_users: int, num_items: int, days: int, windows: Mapping[str, int] | None
) -> dict[str, int]:
    if num_impressions < 1:
        raise ValueError(f"num_impressions must be at least 1, got {num_impressions}")
    if num_users < 1:
        raise ValueError(f"num_users must be at least 1, got {num_users}")
    if num_items < 2:
        raise ValueError(f"num_items must be at least 2, got {num_items}")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")

    windows = dict(ATTRIBUTION_WINDOW_SECONDS if windows is None else windows)
    if sorted(windows) != sorted(ACTIONS):
        raise ValueError(f"windows must name exactly the actions {', '.join(ACTIONS)}; got {sorted(windows)}")
    if windows["click"] < 2 or windows["report"] < 2:
        raise ValueError(f"the click and report windows must be at least 2 seconds, got {windows}")
    # Each funnel step comes at least 1 s after the previous one and inside its own
    # window, which needs a strictly longer window than the previous step's.
    if not windows["click"] < windows["add_to_cart"] < windows["purchase"]:
        raise ValueError(
            f"windows must grow along the funnel (click < add_to_cart < purchase), got {windows}"
        )
    return windows


def _draw_catalog(rng: np.random.Generator, num_users: int, num_items: int) -> _Catalog:
    user_latent = rng.normal(size=(num_users, LATENT_DIM))
    item_latent = rng.normal(size=(num_items, LATENT_DIM))

    # The add_to_cart affinity shares part of its direction with the click affinity
    # (weights 0.6 and 0.8 keep unit variance), so the towers learn related targets.
    user_cart_latent = 0.6 * user_latent + 0.8 * rng.normal(size=(num_users, LATENT_DIM))
    item_cart_latent = 0.6 * item_latent + 0.8 * rng.normal(size=(num_items, LATENT_DIM))

    # Zipf-like popularity over a random order of the ids, so that an id carries no popularity.
    rank = rng.permutation(num_items) + 1
    popularity = rank.astype(np.float64) ** -ZIPF_EXPONENT
    popularity /= popularity.sum()
    log_popularity = np.log(popularity)
    popularity_score = (log_popularity - log_popularity.mean()) / max(log_popularity.std(), 1e-12)

    item_price = np.round(rng.lognormal(mean=3.0, sigma=0.8, size=num_items), 2) + 0.5
    log_price = np.log(item_price)
    price_score = (log_price - log_price.mean()) / max(log_price.std(), 1e-12)

    # About 5% of the items are reported far more often than the rest.
    report_prone = rng.random(num_items) < 0.05
    item_report_bias = rng.normal(0.0, 0.5, num_items) + 2.5 * report_prone

    activity = rng.lognormal(mean=0.0, sigma=0.8, size=num_users)
    return _Catalog(
        user_latent=user_latent,
        user_cart_latent=user_cart_latent,
        user_activity=activity / activity.sum(),
        user_click_bias=rng.normal(0.0, 0.5, num_users),
        user_purchase_bias=rng.normal(0.0, 0.7, num_users),
        user_report_bias=rng.normal(0.0, 0.5, num_users),
        item_latent=item_latent,
        item_cart_latent=item_cart_latent,
        item_popularity=popularity,
        item_click_bias=0.3 * popularity_score + rng.normal(0.0, 0.4, num_items),
        item_price=item_price,
        item_price_score=price_score,
        item_report_bias=item_report_bias,
    )


def _draw_impressions(
    rng: np.random.Generator, num_impressions: int, catalog: _Catalog, start_ms: int, days: int
) -> _Impressions:
    # Request sizes. Every request has at least one impression, so num_impressions
    # requests always cover num_impressions; the last request used is cut to fit.
    search = rng.random(num_impressions) < SEARCH_SHARE
    sizes = np.where(
        search,
        rng.integers(SEARCH_SLOTS[0], SEARCH_SLOTS[1] + 1, num_impressions),
        rng.integers(FEED_SLOTS[0], FEED_SLOTS[1] + 1, num_impressions),
    )
    ends = np.cumsum(sizes)
    num_requests = int(np.searchsorted(ends, num_impressions)) + 1
    sizes = sizes[:num_requests]
    search = search[:num_requests]
    sizes[-1] -= ends[num_requests - 1] - num_impressions

    # Request times: a uniform day, an hour with more traffic in the evening (peak at
    # 20:00 UTC, low at 08:00), and a uniform millisecond within the hour.
    hours = np.arange(24)
    hour_weights = 1.0 + 0.8 * np.cos(2 * np.pi * (hours - 20) / 24)
    day = rng.integers(0, days, num_requests)
    hour = rng.choice(24, size=num_requests, p=hour_weights / hour_weights.sum())
    request_ms = start_ms + day * MS_PER_DAY + hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, num_requests)
    order = np.argsort(request_ms, kind="stable")
    sizes, search, request_ms = sizes[order], search[order], request_ms[order]
    request_user = rng.choice(len(catalog.user_activity), size=num_requests, p=catalog.user_activity)

    # One row per impression, positions 1..size within each request.
    request_id = np.repeat(np.arange(num_requests, dtype=np.int64), sizes)
    request_start = np.cumsum(sizes) - sizes
    position = np.arange(num_impressions, dtype=np.int64) - np.repeat(request_start, sizes) + 1
    user_id = request_user[request_id].astype(np.int64)
    num_items = len(catalog.item_popularity)
    item_id = rng.choice(num_items, size=num_impressions, p=catalog.item_popularity).astype(np.int64)
    repeated = _redraw_repeated_items(rng, user_id, item_id, num_items)

    return _Impressions(
        request_id=request_id,
        user_id=user_id,
        item_id=item_id,
        timestamp_ms=request_ms[request_id],
        position=position,
        search=search[request_id],
        repeated=repeated,
    )


def _redraw_repeated_items(
    rng: np.random.Generator, user_id: np.ndarray, item_id: np.ndarray, num_items: int
) -> np.ndarray:
    """Redraw, uniformly and in place, the item of every later impression of a (user, item) pair.

    Returns the mask of impressions whose pair still repeats after REPEAT_REDRAW_ROUNDS
    rounds (a user with more impressions than there are items always repeats).
    """
    repeated = _repeated_mask(user_id, item_id, num_items, later_only=True)
    for _ in range(REPEAT_REDRAW_ROUNDS):
        if not repeated.any():
            break
        item_id[repeated] = rng.integers(0, num_items, int(repeated.sum()))
        repeated = _repeated_mask(user_id, item_id, num_items, later_only=True)
    return _repeated_mask(user_id, item_id, num_items, later_only=False)


def _repeated_mask(user_id: np.ndarray, item_id: np.ndarray, num_items: int, later_only: bool) -> np.ndarray:
    """Mark impressions whose (user, item) pair occurs more than once.

    With ``later_only`` the first impression of each pair stays unmarked.
    """
    key = user_id * num_items + item_id
    order = np.argsort(key, kind="stable")
    same_as_previous = key[order][1:] == key[order][:-1]
    mask = np.zeros(len(key), dtype=bool)
    mask[order[1:][same_as_previous]] = True
    if not later_only:
        mask[order[:-1][same_as_previous]] = True
    return mask


def _true_probabilities(catalog: _Catalog, impressions: _Impressions, rates: TargetRates) -> dict[str, np.ndarray]:
    """Return the unconditional probability of each action per impression.

    click = examination(position) * sigmoid(affinity + user and item biases), so the
    position bias is multiplicative. add_to_cart given click has its own affinity and
    falls with the price. purchase given cart depends on the user and the price, and
    report on the user and the item only. Each intercept is solved so that the mean
    rate over this log equals the target in ``rates``.
    """
    users, items = impressions.user_id, impressions.item_id
    scale = 1.0 / math.sqrt(LATENT_DIM)

    examination = impressions.position.astype(np.float64) ** -POSITION_BIAS_EXPONENT
    affinity = np.einsum("ij,ij->i", catalog.user_latent[users], catalog.item_latent[items]) * scale
    click_score = affinity + catalog.user_click_bias[users] + catalog.item_click_bias[items]
    p_click = examination * _calibrated_sigmoid(click_score, rates.click, "click", scale=examination)

    cart_affinity = np.einsum("ij,ij->i", catalog.user_cart_latent[users], catalog.item_cart_latent[items]) * scale
    cart_score = 0.8 * cart_affinity - 0.5 * catalog.item_price_score[items]
    p_cart_given_click = _calibrated_sigmoid(
        cart_score, rates.add_to_cart_given_click, "add_to_cart_given_click", weights=p_click
    )
    p_cart = p_click * p_cart_given_click

    purchase_score = catalog.user_purchase_bias[users] - 0.4 * catalog.item_price_score[items]
    p_purchase_given_cart = _calibrated_sigmoid(
        purchase_score, rates.purchase_given_cart, "purchase_given_cart", weights=p_cart
    )

    report_score = catalog.user_report_bias[users] + catalog.item_report_bias[items]
    p_report = _calibrated_sigmoid(report_score, rates.report, "report")

    return {
        "click": p_click,
        "add_to_cart": p_cart,
        "purchase": p_cart * p_purchase_given_cart,
        "report": p_report,
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning for large |x|.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _calibrated_sigmoid(
    score: np.ndarray,
    target: float,
    name: str,
    scale: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Return sigmoid(score + b), with b chosen by bisection so that the weighted mean of
    ``scale * sigmoid(score + b)`` equals ``target``."""
    scale = np.ones_like(score) if scale is None else scale
    weights = np.ones_like(score) if weights is None else weights
    total_weight = weights.sum()
    reachable = float((weights * scale).sum() / total_weight)
    if not 0.0 < target < reachable:
        raise ValueError(f"target rate {name}={target} is outside (0, {reachable:.4f}), the range this log can reach")

    low, high = -40.0, 40.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        mean = float((weights * scale * _sigmoid(score + middle)).sum() / total_weight)
        if mean < target:
            low = middle
        else:
            high = middle
    return _sigmoid(score + 0.5 * (low + high))


def _draw_labels(rng: np.random.Generator, probabilities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Draw 0/1 labels; add_to_cart needs a click and purchase needs an add_to_cart."""
    uniform = rng.random((len(ACTIONS), len(probabilities["click"])))
    click = uniform[0] < probabilities["click"]
    # P(cart | click) = p_cart / p_click; comparing uniform * p_click with p_cart avoids
    # dividing by a probability that may be tiny.
    cart = click & (uniform[1] * probabilities["click"] < probabilities["add_to_cart"])
    purchase = cart & (uniform[2] * probabilities["add_to_cart"] < probabilities["purchase"])
    report = uniform[3] < probabilities["report"]
    return {"click": click, "add_to_cart": cart, "purchase": purchase, "report": report}


def _truncated_delay(rng: np.random.Generator, mean_ms: float, high_ms: np.ndarray) -> np.ndarray:
    """Draw exponential delays with mean ``mean_ms`` truncated to [MIN_DELAY_MS, high_ms], in ms."""
    span = np.asarray(high_ms, dtype=np.float64) - MIN_DELAY_MS
    uniform = rng.random(len(span))
    # Inverse CDF of the exponential distribution restricted to [0, span].
    delay = -mean_ms * np.log1p(-uniform * -np.expm1(-span / mean_ms))
    return MIN_DELAY_MS + np.minimum(np.floor(delay), span).astype(np.int64)


def _draw_events(
    rng: np.random.Generator,
    impressions: _Impressions,
    labels: dict[str, np.ndarray],
    windows: dict[str, int],
) -> _Events:
    window_ms = {action: seconds * MS_PER_SECOND for action, seconds in windows.items()}
    num_impressions = len(impressions.user_id)
    parts: list[tuple[np.ndarray, int, np.ndarray, int]] = []

    # One event per positive, each strictly inside its window and after the previous funnel step.
    click_delay = np.zeros(num_impressions, dtype=np.int64)
    clicked = np.flatnonzero(labels["click"])
    click_high = np.full(len(clicked), window_ms["click"] - MIN_DELAY_MS)
    click_delay[clicked] = _truncated_delay(rng, MEAN_DELAY_MS["click"], click_high)
    parts.append((clicked, 0, click_delay[clicked], _KIND_POSITIVE))

    cart_delay = np.zeros(num_impressions, dtype=np.int64)
    carted = np.flatnonzero(labels["add_to_cart"])
    cart_high = window_ms["add_to_cart"] - MIN_DELAY_MS - click_delay[carted]
    cart_delay[carted] = click_delay[carted] + _truncated_delay(rng, MEAN_DELAY_MS["add_to_cart"], cart_high)
    parts.append((carted, 1, cart_delay[carted], _KIND_POSITIVE))

    purchased = np.flatnonzero(labels["purchase"])
    purchase_high = window_ms["purchase"] - MIN_DELAY_MS - cart_delay[purchased]
    purchase_delay = cart_delay[purchased] + _truncated_delay(rng, MEAN_DELAY_MS["purchase"], purchase_high)
    parts.append((purchased, 2, purchase_delay, _KIND_POSITIVE))

    reported = np.flatnonzero(labels["report"])
    report_high = np.full(len(reported), window_ms["report"] - MIN_DELAY_MS)
    parts.append((reported, 3, _truncated_delay(rng, MEAN_DELAY_MS["report"], report_high), _KIND_POSITIVE))

    # Late events: 1 minute to 6 hours after the window closes, on impressions whose
    # label stays 0 and whose (user, item) pair is unique, so that no other impression
    # can claim them. The funnel order holds: a late add_to_cart follows a click.
    late_candidates = {
        "click": ~labels["click"],
        "add_to_cart": labels["click"] & ~labels["add_to_cart"],
        "purchase": labels["add_to_cart"] & ~labels["purchase"],
        "report": ~labels["report"],
    }
    for code, action in enumerate(ACTIONS):
        candidates = np.flatnonzero(late_candidates[action] & ~impressions.repeated)
        count = min(len(candidates), max(1, round(LATE_EVENT_SHARE * int(labels[action].sum()))))
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        delay = window_ms[action] + rng.integers(60 * MS_PER_SECOND, 6 * MS_PER_HOUR, count)
        parts.append((chosen, code, delay, _KIND_LATE))

    # Events of an action that no config names.
    shared = np.sort(rng.choice(num_impressions, size=round(UNKNOWN_ACTION_RATE * num_impressions), replace=False))
    share_delay = _truncated_delay(rng, MEAN_DELAY_MS[UNKNOWN_ACTION], np.full(len(shared), MS_PER_HOUR))
    parts.append((shared, len(ACTIONS), share_delay, _KIND_UNKNOWN))

    impression = np.concatenate([p[0] for p in parts])
    return _Events(
        impression=impression,
        action=np.concatenate([np.full(len(p[0]), p[1], dtype=np.int8) for p in parts]),
        timestamp_ms=impressions.timestamp_ms[impression] + np.concatenate([p[2] for p in parts]),
        kind=np.concatenate([np.full(len(p[0]), p[3], dtype=np.int8) for p in parts]),
        has_impression_id=rng.random(len(impression)) < EVENTS_WITH_IMPRESSION_ID,
    )


def _add_duplicates(rng: np.random.Generator, events: _Events) -> _Events:
    """Append exact copies of a few positive events, as an at-least-once event pipeline would."""
    chosen = (events.kind == _KIND_POSITIVE) & (rng.random(len(events.kind)) < DUPLICATE_EVENT_RATE)
    copies = events.select(chosen)
    copies.kind = np.full(len(copies.kind), _KIND_DUPLICATE, dtype=np.int8)
    return events.append(copies)


def _string_array(codes: np.ndarray, values: tuple[str, ...]) -> pa.Array:
    dictionary = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(values)))
    return dictionary.cast(pa.string())


def _impression_table(
    impressions: _Impressions, catalog: _Catalog, probabilities: dict[str, np.ndarray]
) -> pa.Table:
    columns = {
        "impression_id": pa.array(np.arange(len(impressions.user_id), dtype=np.int64)),
        "request_id": pa.array(impressions.request_id),
        "user_id": pa.array(impressions.user_id),
        "item_id": pa.array(impressions.item_id),
        "timestamp": timestamp_array(impressions.timestamp_ms),
        "position": pa.array(impressions.position),
        "surface": _string_array(impressions.search.astype(np.int8), ("feed", "search")),
        "item_price": pa.array(catalog.item_price[impressions.item_id]),
    }
    for action in ACTIONS:
        columns[f"true_p_{action}"] = pa.array(probabilities[action].astype(np.float64))
    return pa.table(columns)


def _event_table(events: _Events, impressions: _Impressions) -> pa.Table:
    return pa.table(
        {
            "impression_id": pa.array(events.impression.astype(np.int64), mask=~events.has_impression_id),
            "user_id": pa.array(impressions.user_id[events.impression]),
            "item_id": pa.array(impressions.item_id[events.impression]),
            "action": _string_array(events.action, _EVENT_ACTIONS),
            "timestamp": timestamp_array(events.timestamp_ms),
        }
    )


def _summary(
    impressions: _Impressions,
    probabilities: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    events: _Events,
    windows: dict[str, int],
    log_end_ms: int,
) -> dict:
    """Collect the counts that a reader of the two logs cannot see directly."""
    def count(kind: int, code: int) -> int:
        return int(((events.kind == kind) & (events.action == code)).sum())

    num_impressions = len(impressions.user_id)
    max_window_ms = max(windows.values()) * MS_PER_SECOND
    return {
        "impressions": num_impressions,
        "requests": int(impressions.request_id[-1]) + 1,
        "users": int(len(np.unique(impressions.user_id))),
        "items": int(len(np.unique(impressions.item_id))),
        "first_impression": iso_utc(int(impressions.timestamp_ms[0])),
        "last_impression": iso_utc(int(impressions.timestamp_ms[-1])),
        "log_end": iso_utc(log_end_ms),
        "impressions_with_open_window": int((impressions.timestamp_ms + max_window_ms > log_end_ms).sum()),
        "repeated_user_item_impressions": int(impressions.repeated.sum()),
        "attribution_window_seconds": dict(windows),
        "positives": {a: int(labels[a].sum()) for a in ACTIONS},
        "label_rates": {a: float(labels[a].mean()) for a in ACTIONS},
        "true_p_mean": {a: float(probabilities[a].mean()) for a in ACTIONS},
        "events": int(len(events.impression)),
        "events_by_action": {a: int((events.action == code).sum()) for code, a in enumerate(_EVENT_ACTIONS)},
        "late_events": {a: count(_KIND_LATE, code) for code, a in enumerate(ACTIONS)},
        "duplicate_events": int((events.kind == _KIND_DUPLICATE).sum()),
        "events_with_impression_id": int(events.has_impression_id.sum()),
        "unknown_action_events": count(_KIND_UNKNOWN, len(ACTIONS)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic impression and event log with known action probabilities.")
    parser.add_argument("--out", required=True, help="output folder; gets impressions/ and events/")
    parser.add_argument("--impressions", type=positive_int, default=200_000, help="number of impressions")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--users", type=int, default=10_000, help="number of user ids (0 .. users-1)")
    parser.add_argument("--items", type=int, default=5_000, help="number of item ids (0 .. items-1)")
    parser.add_argument("--days", type=int, default=14, help="days of impressions")
    parser.add_argument("--start", default="2024-03-04T00:00:00Z", help="UTC time of the first possible impression")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = generate(
        args.out,
        args.impressions,
        args.seed,
        num_users=args.users,
        num_items=args.items,
        days=args.days,
        start=args.start,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
