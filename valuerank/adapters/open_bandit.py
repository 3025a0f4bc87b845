"""Convert the Open Bandit Dataset random/all sample into raw impression and event logs.

The source is the 10,000-row sample of the Open Bandit Dataset (ZOZOTOWN, random
logging policy, "all" campaign): ``impressions.csv`` (``all.csv`` inside the obp
package) with one row per impression and a 0/1 ``click``, plus ``item_context.csv``
with item features. The obp 0.4.1 wheel ships both files under
``obp/dataset/obd/random/all/``::

    pip download obp==0.4.1 --no-deps --python-version 3.10 --only-binary=:all:
    unzip obp-0.4.1-*.whl 'obp/dataset/obd/*' -d obp-wheel
    python -m valuerank.adapters.open_bandit --src obp-wheel --out runs/open_bandit/raw

Impressions get ``impression_id`` = row number, ``position`` (1-3), the
timestamp (UTC text, truncated to milliseconds), and the passthrough features
``propensity_score`` and ``item_feature_0`` (joined from item_context.csv, NULL
when that file or the item is missing). The four categorical user features become
int64 columns ``user_feature_0..3`` (a stable hash of each string), and
``user_id`` is a stable hash of all four, because the dataset has no user id.
Events carry the impression_id: one "click" event per click, 1 s after the impression.

Command::

    python -m valuerank.adapters.open_bandit --src ../shared/datasets/open-bandit-random --out runs/open_bandit/raw
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from valuerank.adapters import iso_utc, stable_id, timestamp_array, write_raw_logs

logger = logging.getLogger(__name__)

SOURCE_FOLDERS = ("", "all", "random/all", "obd/random/all", "dataset/obd/random/all", "obp/dataset/obd/random/all")
"""Folders under ``--src`` searched for the impression file, in order."""

IMPRESSION_FILES = ("impressions.csv", "all.csv")
ITEM_CONTEXT_FILE = "item_context.csv"

USER_FEATURES = tuple(f"user_feature_{i}" for i in range(4))
REQUIRED_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score", *USER_FEATURES)

CLICK_DELAY_MS = 1000
USER_KEY_SEPARATOR = "|"
"""Joins the four user feature strings before hashing; the strings are hex digests without it."""


def find_source(src_dir: str | Path) -> tuple[Path, Path | None]:
    """Return the impression CSV and the item context CSV (None if absent) under ``src_dir``.

    ``src_dir`` may be the folder with impressions.csv or the unpacked obp wheel.
    """
    src_dir = Path(src_dir)
    tried = []
    for folder in SOURCE_FOLDERS:
        for name in IMPRESSION_FILES:
            path = src_dir / folder / name
            tried.append(str(path))
            if path.is_file():
                context = path.parent / ITEM_CONTEXT_FILE
                return path, context if context.is_file() else None
    raise FileNotFoundError(
        f"Open Bandit impressions not found under {src_dir}; tried {', '.join(tried)}. Pass the folder "
        "with impressions.csv, or the unpacked obp==0.4.1 wheel"
    )


def user_feature_id(value: str) -> int:
    """Return the int64 id of one user feature string."""
    return stable_id(value)


def user_id_of(features: tuple[str, str, str, str]) -> int:
    """Return the int64 user id of the four user feature strings of one impression."""
    return stable_id(USER_KEY_SEPARATOR.join(features))


def convert(src_dir: str | Path, out_dir: str | Path) -> dict:
    """Convert the Open Bandit sample under ``src_dir`` into ``out_dir`` and return a summary."""
    impressions_csv, context_csv = find_source(src_dir)
    source = _read_impressions(impressions_csv)
    num_rows = len(source)

    timestamp_ms = _epoch_ms(source["timestamp"], impressions_csv)
    item_id = source["item_id"].to_numpy(dtype=np.int64)
    user_features = source[list(USER_FEATURES)]

    # Impressions, in source row order.
    columns = {
        "impression_id": pa.array(np.arange(num_rows, dtype=np.int64)),
        "user_id": pa.array(_hash_rows(user_features), type=pa.int64()),
        "item_id": pa.array(item_id),
        "timestamp": timestamp_array(timestamp_ms),
        "position": pa.array(source["position"].to_numpy(dtype=np.int64)),
        "propensity_score": pa.array(source["propensity_score"].to_numpy(dtype=np.float64)),
    }
    missing_items = 0
    if context_csv is None:
        logger.warning(
            "%s not found beside %s; item_feature_0 is NULL, and a config that uses it as a dense "
            "feature gets 0 for every row",
            ITEM_CONTEXT_FILE,
            impressions_csv,
        )
        columns["item_feature_0"] = pa.nulls(num_rows, type=pa.float64())
    else:
        item_feature_0 = source["item_id"].map(_read_item_feature(context_csv))
        missing_items = int(item_feature_0.isna().sum())
        if missing_items:
            logger.warning("%s: %d impressions show an item missing from %s", impressions_csv, missing_items, context_csv)
        columns["item_feature_0"] = pa.array(item_feature_0.to_numpy(dtype=np.float64), from_pandas=True)
    for name in USER_FEATURES:
        columns[name] = pa.array(_hash_values(user_features[name]), type=pa.int64())
    impressions = pa.table(columns)

    # One click event per clicked impression, with its impression_id.
    clicked = np.flatnonzero(source["click"].to_numpy() == 1)
    events = pa.table(
        {
            "impression_id": pa.array(clicked.astype(np.int64)),
            "user_id": impressions["user_id"].take(clicked),
            "item_id": pa.array(item_id[clicked]),
            "action": pa.array(["click"] * len(clicked), type=pa.string()),
            "timestamp": timestamp_array(timestamp_ms[clicked] + CLICK_DELAY_MS),
        }
    )

    paths = write_raw_logs(out_dir, impressions, events)
    summary = {
        "source": str(impressions_csv),
        "item_context": str(context_csv) if context_csv else None,
        "impressions": num_rows,
        "users": int(len(np.unique(impressions["user_id"].to_numpy()))),
        "items": int(len(np.unique(item_id))),
        "first_impression": iso_utc(int(timestamp_ms.min())),
        "last_impression": iso_utc(int(timestamp_ms.max())),
        "positives": {"click": int(len(clicked))},
        "events": int(events.num_rows),
        "impressions_with_unknown_item": missing_items,
        "paths": paths,
    }
    logger.info("converted %d Open Bandit impressions and %d click events from %s", num_rows, len(clicked), impressions_csv)
    return summary


def _read_impressions(path: Path) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{path}: missing column {missing[0]!r}; expected an Open Bandit Dataset CSV with the columns "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )

    source = pd.read_csv(path, usecols=list(REQUIRED_COLUMNS), dtype={c: str for c in USER_FEATURES})
    for column in REQUIRED_COLUMNS:
        empty = int(source[column].isna().sum())
        if empty:
            raise ValueError(f"{path}: column {column!r} has {empty} empty values")
    bad_click = ~source["click"].isin([0, 1])
    if bad_click.any():
        row = int(np.flatnonzero(bad_click.to_numpy())[0])
        raise ValueError(f"{path}: column 'click' must be 0 or 1, got {source['click'].iloc[row]!r} in data row {row + 1}")
    return source


def _read_item_feature(path: Path) -> pd.Series:
    """Return item_feature_0 indexed by item_id."""
    context = pd.read_csv(path, usecols=["item_id", "item_feature_0"])
    if context["item_id"].duplicated().any():
        duplicate = int(context.loc[context["item_id"].duplicated(), "item_id"].iloc[0])
        raise ValueError(f"{path}: item_id {duplicate} appears more than once")
    return context.set_index("item_id")["item_feature_0"].astype(np.float64)


def _epoch_ms(text: pd.Series, path: Path) -> np.ndarray:
    """Parse the UTC timestamp text into epoch milliseconds, truncating microseconds."""
    try:
        parsed = pd.to_datetime(text, utc=True, format="ISO8601")
    except ValueError as error:
        raise ValueError(f"{path}: invalid value in column 'timestamp': {error}") from error
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy(dtype=np.int64)


def _hash_values(values: pd.Series) -> np.ndarray:
    """Hash each distinct string once and map the ids back to the rows."""
    codes, uniques = pd.factorize(values)
    ids = np.array([user_feature_id(v) for v in uniques], dtype=np.int64)
    return ids[codes]


def _hash_rows(features: pd.DataFrame) -> np.ndarray:
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(features))
    ids = np.array([user_id_of(tuple(row)) for row in uniques], dtype=np.int64)
    return ids[codes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert the Open Bandit Dataset sample into raw impression and event logs.")
    parser.add_argument("--src", required=True, help="folder with impressions.csv, or the unpacked obp==0.4.1 wheel")
    parser.add_argument("--out", required=True, help="output folder; gets impressions/ and events/")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(convert(args.src, args.out), indent=2))


if __name__ == "__main__":
    main()
