"""The label join and the downsampling written again in DuckDB SQL, from the policies in docs/data-policies.md.

This code shares nothing with ``spark_jobs`` except the written policies, so the property
tests can require identical results from both. Times are integers: microseconds since the
epoch in UTC. Inputs are DuckDB views or tables:

- impressions: ``impression_id, user_id, item_id, t`` and any other columns
- events: ``user_id, item_id, action, t, impression_id``
- labelled: ``impression_id, t``, the label columns and an optional stratum column
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb
import numpy as np

MICROS_PER_DAY = 86_400 * 1_000_000


@dataclass(frozen=True)
class Action:
    """A configured action and its attribution window in microseconds."""

    name: str
    window_us: int

    @property
    def label(self) -> str:
        return f"label_{self.name}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _window_case(actions: list[Action], column: str) -> str:
    branches = " ".join(f"WHEN {column} = {_quote(a.name)} THEN {a.window_us}" for a in actions)
    return f"(CASE {branches} END)"


def default_as_of(con: duckdb.DuckDBPyConnection, impressions: str, events: str) -> int | None:
    """Return the latest event time, else the latest impression time, else None."""
    latest_event = con.execute(f"SELECT max(t) FROM {events}").fetchone()[0]
    if latest_event is not None:
        return latest_event
    return con.execute(f"SELECT max(t) FROM {impressions}").fetchone()[0]


def label_join(
    con: duckdb.DuckDBPyConnection,
    impressions: str,
    events: str,
    actions: list[Action],
    as_of_us: int | None,
    tie_columns: list[str],
) -> None:
    """Create tables ``ref_impressions`` (each impression with its outcome), ``ref_events`` and ``ref_labelled``.

    ``tie_columns`` are the other impression columns that decide, after time, user and item,
    which of several rows with one impression id is kept (NULL first, as in Spark's sort).
    """
    max_window = max(a.window_us for a in actions)
    ties = "".join(f", {c} ASC NULLS FIRST" for c in tie_columns)
    open_window = "FALSE" if as_of_us is None else f"t + {max_window} > {as_of_us}"
    names = ", ".join(_quote(a.name) for a in actions)

    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE ref_impressions AS
        WITH checked AS (
            SELECT *, CASE
                WHEN impression_id IS NULL THEN 'null_impression_id'
                WHEN user_id IS NULL THEN 'null_user_id'
                WHEN item_id IS NULL THEN 'null_item_id'
                WHEN t IS NULL THEN 'null_timestamp'
            END AS reason
            FROM {impressions}
        ),
        ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY impression_id ORDER BY t, user_id, item_id{ties}
            ) AS copy_rank
            FROM checked WHERE reason IS NULL
        )
        SELECT * EXCLUDE (reason, copy_rank), CASE
            WHEN copy_rank > 1 THEN 'duplicate_impression_id'
            WHEN {open_window} THEN 'open_window'
            ELSE 'labelled'
        END AS outcome
        FROM ranked
        UNION ALL BY NAME
        SELECT * EXCLUDE (reason), reason AS outcome FROM checked WHERE reason IS NOT NULL
    """)

    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE ref_events AS
        WITH checked AS (
            SELECT user_id, item_id, action, t, impression_id, CASE
                WHEN action IS NULL THEN 'null_action'
                WHEN t IS NULL THEN 'null_timestamp'
                WHEN impression_id IS NULL AND user_id IS NULL THEN 'null_user_id'
                WHEN impression_id IS NULL AND item_id IS NULL THEN 'null_item_id'
                WHEN action NOT IN ({names}) THEN 'unknown_action'
            END AS reason
            FROM {events}
        ),
        copies AS (
            SELECT *, row_number() OVER (PARTITION BY user_id, item_id, action, t, impression_id) AS copy_rank
            FROM checked WHERE reason IS NULL
        ),
        valid AS (SELECT * EXCLUDE (reason, copy_rank) FROM copies WHERE copy_rank = 1),
        kept AS (
            SELECT impression_id, user_id, item_id, t, outcome = 'open_window' AS held
            FROM ref_impressions WHERE outcome IN ('labelled', 'open_window')
        ),
        known_ids AS (SELECT DISTINCT impression_id FROM ref_impressions WHERE impression_id IS NOT NULL),
        by_id AS (
            SELECT v.*, CASE
                WHEN n.impression_id IS NULL THEN 'unknown_impression_id'
                WHEN k.impression_id IS NULL THEN 'impression_dropped'
                WHEN v.t < k.t THEN 'before_impression'
                WHEN v.t > k.t + {_window_case(actions, 'v.action')} THEN 'outside_window'
                WHEN k.held THEN 'attributed_to_held_back'
                ELSE 'attributed'
            END AS outcome,
            v.impression_id AS candidate
            FROM valid v
            LEFT JOIN known_ids n ON v.impression_id = n.impression_id
            LEFT JOIN kept k ON v.impression_id = k.impression_id
            WHERE v.impression_id IS NOT NULL
        ),
        latest_per_time AS (
            SELECT user_id, item_id, t, max(impression_id) AS impression_id FROM kept GROUP BY user_id, item_id, t
        ),
        shown_pairs AS (SELECT DISTINCT user_id, item_id FROM kept),
        matched AS (
            SELECT v.*, m.impression_id AS candidate, m.t AS candidate_t
            FROM (SELECT * FROM valid WHERE impression_id IS NULL) v
            ASOF LEFT JOIN latest_per_time m
            ON v.user_id = m.user_id AND v.item_id = m.item_id AND v.t >= m.t
        ),
        by_user_item AS (
            SELECT m.* EXCLUDE (candidate_t), CASE
                WHEN m.candidate IS NULL AND p.user_id IS NULL THEN 'no_impression'
                WHEN m.candidate IS NULL THEN 'before_impression'
                WHEN m.t > m.candidate_t + {_window_case(actions, 'm.action')} THEN 'outside_window'
                WHEN k.held THEN 'attributed_to_held_back'
                ELSE 'attributed'
            END AS outcome
            FROM matched m
            LEFT JOIN shown_pairs p ON m.user_id = p.user_id AND m.item_id = p.item_id
            LEFT JOIN kept k ON m.candidate = k.impression_id
        )
        SELECT * EXCLUDE (candidate), CASE WHEN outcome LIKE 'attributed%' THEN candidate END AS target FROM by_id
        UNION ALL BY NAME SELECT * EXCLUDE (candidate), CASE WHEN outcome LIKE 'attributed%' THEN candidate END AS target FROM by_user_item
        UNION ALL BY NAME SELECT * EXCLUDE (reason), reason AS outcome, NULL::BIGINT AS target FROM checked WHERE reason IS NOT NULL
        UNION ALL BY NAME SELECT * EXCLUDE (copy_rank, reason), 'duplicate' AS outcome, NULL::BIGINT AS target FROM copies WHERE copy_rank > 1
    """)

    labels = ", ".join(f"coalesce(max(CASE WHEN e.action = {_quote(a.name)} THEN 1 END), 0)::TINYINT AS {a.label}" for a in actions)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE ref_labelled AS
        SELECT i.* EXCLUDE (outcome), {labels}
        FROM (SELECT * FROM ref_impressions WHERE outcome = 'labelled') i
        LEFT JOIN (SELECT * FROM ref_events WHERE outcome = 'attributed') e ON e.target = i.impression_id
        GROUP BY ALL
    """)


# --- downsampling ------------------------------------------------------------

_P1 = np.uint64(11400714785074694791)
_P2 = np.uint64(14029467366897019727)
_P3 = np.uint64(1609587929392839161)
_P4 = np.uint64(9650029242287828579)
_P5 = np.uint64(2870177450012600261)


def _rotate_left(values: np.ndarray, bits: int) -> np.ndarray:
    return (values << np.uint64(bits)) | (values >> np.uint64(64 - bits))


def _xxhash64_long(values: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """XXH64 of each 8-byte little-endian value, as specified by the xxHash format, with per-row seeds."""
    with np.errstate(over="ignore"):
        state = seeds + _P5 + np.uint64(8)
        state ^= _rotate_left(values * _P2, 31) * _P1
        state = _rotate_left(state, 27) * _P1 + _P4
        state ^= state >> np.uint64(33)
        state *= _P2
        state ^= state >> np.uint64(29)
        state *= _P3
        state ^= state >> np.uint64(32)
    return state


def keep_uniform(impression_ids: np.ndarray, seed: int) -> np.ndarray:
    """Return the documented keep draw in [0, 1): the top 53 bits of xxhash64(seed, id) over 2**53.

    The two-column hash starts from seed 42 and hashes the seed, then the id, each as a
    64-bit integer (the definition of Spark SQL's ``xxhash64``).
    """
    ids = impression_ids.astype(np.int64).view(np.uint64)
    start = np.full(len(ids), 42, dtype=np.uint64)
    seed_state = _xxhash64_long(np.full(len(ids), seed, dtype=np.int64).view(np.uint64), start)
    hashed = _xxhash64_long(ids, seed_state)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass(frozen=True)
class DownsampleSettings:
    """The downsampling and split settings that the reference implements."""

    seed: int
    eval_days: float | None
    eval_start_us: int | None
    keep_rates: dict[str, float]
    keep_positives: bool
    target_negative_ratio: float | None
    stratum_column: str | None


class ReferenceRejects(Exception):
    """The settings and data make the job fail (for example an empty split); the reference names why."""


def _keep_rate(stratum: str, rows: dict[str, int], settings: DownsampleSettings) -> float:
    value, pattern = stratum.rsplit("/", 1) if settings.stratum_column else ("", stratum)
    if stratum in settings.keep_rates:
        rate = settings.keep_rates[stratum]
    elif pattern in settings.keep_rates:
        rate = settings.keep_rates[pattern]
    elif pattern != "negative" and settings.keep_positives:
        rate = 1.0
    elif pattern != "negative":
        raise ReferenceRejects(f"positive stratum {stratum} without a keep rate")
    elif settings.target_negative_ratio is not None:
        def same_value(name: str) -> bool:
            return not settings.stratum_column or name.rsplit("/", 1)[0] == value

        positives = sum(n for name, n in rows.items() if same_value(name) and not name.endswith("negative"))
        negatives = sum(n for name, n in rows.items() if same_value(name) and name.endswith("negative"))
        rate = min(1.0, settings.target_negative_ratio * positives / negatives)
    else:
        rate = 1.0
    if not (math.isfinite(rate) and 0 < rate <= 1):
        raise ReferenceRejects(f"keep rate {rate} of stratum {stratum}")
    return rate


def downsample(con: duckdb.DuckDBPyConnection, labelled: str, actions: list[Action], settings: DownsampleSettings) -> dict[str, float]:
    """Create tables ``ref_train`` and ``ref_eval`` (``impression_id, stratum, keep_rate, weight``); return the keep rates.

    ``labelled`` must have a ``keep_draw`` column with ``keep_uniform`` of each impression id.
    Raise ReferenceRejects where the job must fail.
    """
    max_t = con.execute(f"SELECT max(t) FROM {labelled}").fetchone()[0]
    if settings.eval_start_us is not None:
        eval_start = settings.eval_start_us
    else:
        eval_start = max_t - round(settings.eval_days * MICROS_PER_DAY)

    pattern_parts = ", ".join(f"CASE WHEN {a.label} = 1 THEN {_quote(a.name)} END" for a in actions)
    pattern = f"coalesce(nullif(concat_ws('+', {pattern_parts}), ''), 'negative')"
    if settings.stratum_column:
        stratum = f"coalesce(CAST({settings.stratum_column} AS VARCHAR), '__null__') || '/' || {pattern}"
    else:
        stratum = pattern
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE ref_strata AS
        SELECT impression_id, keep_draw, t >= {eval_start} AS is_eval, {stratum} AS stratum FROM {labelled}
    """)
    counts = dict(con.execute("SELECT stratum, count(*) FROM ref_strata WHERE NOT is_eval GROUP BY stratum").fetchall())
    eval_rows = con.execute("SELECT count(*) FROM ref_strata WHERE is_eval").fetchone()[0]
    if not counts or not eval_rows:
        raise ReferenceRejects("empty split")

    rates = {stratum: _keep_rate(stratum, counts, settings) for stratum in counts}
    con.execute("CREATE OR REPLACE TEMP TABLE ref_rates (stratum VARCHAR, keep_rate DOUBLE)")
    con.executemany("INSERT INTO ref_rates VALUES (?, ?)", sorted(rates.items()))
    con.execute("""
        CREATE OR REPLACE TEMP TABLE ref_train AS
        SELECT s.impression_id, s.stratum, r.keep_rate, 1.0 / r.keep_rate AS weight
        FROM ref_strata s JOIN ref_rates r USING (stratum)
        WHERE NOT s.is_eval AND s.keep_draw < r.keep_rate
    """)
    if con.execute("SELECT count(*) FROM ref_train").fetchone()[0] == 0:
        raise ReferenceRejects("downsampling keeps no training row")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE ref_eval AS
        SELECT impression_id, stratum, 1.0::DOUBLE AS keep_rate, 1.0::DOUBLE AS weight FROM ref_strata WHERE is_eval
    """)
    return rates
