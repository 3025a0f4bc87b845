"""Convert the KuaiRand like/hate log into raw impression and event logs.

The source is a tab-separated file with one row per video impression and one 0/1
flag per action. Its rows come from KuaiRand-27K and are those where the user
liked or hated the video, and ``label`` is 1 for like and 0 for hate. The file has
the impression time ``time_ms`` and the watch time ``play_time_ms`` but no time for
any action, so the converter places each positive flag at a time consistent with it:

- click: ``time_ms + 1 s``. A click opens the video, so it comes before any watch time.
- long_view, like, hate, follow, comment, forward, profile_enter:
  ``time_ms + max(play_time_ms, 1 s)``. The log does not say when during the play
  they happened, and the end of the play is consistent with every flag. The 1 s
  floor keeps an event from sharing the impression's timestamp when the play time is 0.

The longest play time in the shipped file is 612,577 ms (10.2 minutes), so
attribution windows of 15 minutes cover every event (configs/kuairand.toml).

Impressions get ``impression_id`` = row number, ``item_id`` = ``video_id``, a
``position`` column of NULLs (the log has no slot, and a TOML config cannot unset
``columns.impressions.position``), and the passthrough features ``duration_ms``
and ``hour`` (hour of day in China Standard Time, UTC+8, where the app is used).
Events carry no impression_id, so the label join attributes them by user and item.
In some rows the same user sees the same video again. The summary counts those
impressions, because attribution by user and item can move events between them.

Command::

    python -m valuerank.adapters.kuairand --src ../shared/datasets/kuairand-likehate/log.tsv --out runs/kuairand/raw
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from valuerank.adapters import iso_utc, timestamp_array, write_raw_logs

logger = logging.getLogger(__name__)

FLAG_COLUMNS = {
    "click": "is_click",
    "long_view": "long_view",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "profile_enter": "is_profile_enter",
}
"""Action name -> source 0/1 column; like and hate come from ``label`` instead."""

ACTIONS = ("click", "long_view", "like", "hate", "follow", "comment", "forward", "profile_enter")
"""Actions written to the event log, in the order of configs/kuairand.toml."""

REQUIRED_COLUMNS = ("user_id", "video_id", "time_ms", "play_time_ms", "duration_ms", "label", *FLAG_COLUMNS.values())

CLICK_DELAY_MS = 1000
MIN_PLAY_DELAY_MS = 1000
UTC_OFFSET_HOURS = 8
"""China Standard Time has no daylight saving time, so a fixed offset gives the local hour."""


def convert(src_tsv: str | Path, out_dir: str | Path) -> dict:
    """Convert the KuaiRand TSV at ``src_tsv`` into ``out_dir`` and return a summary."""
    src_tsv = Path(src_tsv)
    source = _read_source(src_tsv)
    num_rows = source.num_rows

    user_id = source["user_id"].to_numpy()
    item_id = source["video_id"].to_numpy()
    time_ms = source["time_ms"].to_numpy()
    play_time_ms = source["play_time_ms"].to_numpy()
    negative_play_time = int((play_time_ms < 0).sum())
    if negative_play_time:
        logger.warning("%s: %d rows have a negative play_time_ms; their events use 1 s", src_tsv, negative_play_time)

    # Impressions, in source row order.
    hour = ((time_ms // 3_600_000) + UTC_OFFSET_HOURS) % 24
    impressions = pa.table(
        {
            "impression_id": pa.array(np.arange(num_rows, dtype=np.int64)),
            "user_id": pa.array(user_id),
            "item_id": pa.array(item_id),
            "timestamp": timestamp_array(time_ms),
            "position": pa.nulls(num_rows, type=pa.int64()),
            "duration_ms": source["duration_ms"].combine_chunks(),
            "hour": pa.array(hour.astype(np.int64)),
        }
    )

    # One event per positive flag; see the module docstring for the event times.
    flags = _action_flags(source)
    play_end_ms = time_ms + np.maximum(play_time_ms, MIN_PLAY_DELAY_MS)
    rows, actions, event_ms = [], [], []
    for code, action in enumerate(ACTIONS):
        positive = np.flatnonzero(flags[action])
        rows.append(positive)
        actions.append(np.full(len(positive), code, dtype=np.int32))
        event_ms.append(time_ms[positive] + CLICK_DELAY_MS if action == "click" else play_end_ms[positive])
    rows, actions, event_ms = np.concatenate(rows), np.concatenate(actions), np.concatenate(event_ms)
    order = np.lexsort((actions, rows, event_ms))
    rows, actions, event_ms = rows[order], actions[order], event_ms[order]
    events = pa.table(
        {
            "user_id": pa.array(user_id[rows]),
            "item_id": pa.array(item_id[rows]),
            "action": pa.DictionaryArray.from_arrays(pa.array(actions), pa.array(list(ACTIONS))).cast(pa.string()),
            "timestamp": timestamp_array(event_ms),
        }
    )

    paths = write_raw_logs(out_dir, impressions, events)
    delay_ms = event_ms - time_ms[rows]
    summary = {
        "source": str(src_tsv),
        "impressions": num_rows,
        "users": int(len(np.unique(user_id))),
        "items": int(len(np.unique(item_id))),
        "first_impression": iso_utc(int(time_ms.min())),
        "last_impression": iso_utc(int(time_ms.max())),
        "last_event": iso_utc(int(event_ms.max())) if len(event_ms) else None,
        "max_event_delay_seconds": float(delay_ms.max()) / 1000 if len(delay_ms) else 0.0,
        "positives": {action: int(flags[action].sum()) for action in ACTIONS},
        "events": int(events.num_rows),
        "repeated_user_item_impressions": _repeated_pairs(user_id, item_id),
        "negative_play_time_rows": negative_play_time,
        "paths": paths,
    }
    logger.info("converted %d KuaiRand impressions and %d events from %s", num_rows, events.num_rows, src_tsv)
    return summary


def _read_source(src_tsv: Path) -> pa.Table:
    if not src_tsv.is_file():
        raise FileNotFoundError(
            f"KuaiRand log not found: {src_tsv}; pass the path of log.tsv with --src"
        )
    with src_tsv.open() as handle:
        header = handle.readline().rstrip("\n").split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{src_tsv}: missing column {missing[0]!r}; expected a tab-separated KuaiRand log with the "
            f"columns {', '.join(REQUIRED_COLUMNS)}"
        )

    table = pacsv.read_csv(
        src_tsv,
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(REQUIRED_COLUMNS),
            column_types={c: pa.int64() for c in REQUIRED_COLUMNS},
        ),
    )
    for column in REQUIRED_COLUMNS:
        if table[column].null_count:
            raise ValueError(f"{src_tsv}: column {column!r} has {table[column].null_count} empty values")
    for column in ("label", *FLAG_COLUMNS.values()):
        bad = pc.invert(pc.is_in(table[column], value_set=pa.array([0, 1], type=pa.int64())))
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise ValueError(
                f"{src_tsv}: column {column!r} must be 0 or 1, got {table[column][row].as_py()} "
                f"in data row {row + 1}"
            )
    return table


def _action_flags(source: pa.Table) -> dict[str, np.ndarray]:
    flags = {action: source[column].to_numpy() == 1 for action, column in FLAG_COLUMNS.items()}
    label = source["label"].to_numpy()
    flags["like"] = label == 1
    flags["hate"] = label == 0
    return flags


def _repeated_pairs(user_id: np.ndarray, item_id: np.ndarray) -> int:
    """Count impressions whose (user_id, item_id) pair occurs on another impression too."""
    _, inverse, counts = np.unique(np.stack([user_id, item_id], axis=1), axis=0, return_inverse=True, return_counts=True)
    return int((counts[inverse.ravel()] > 1).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert the KuaiRand like/hate log into raw impression and event logs.")
    parser.add_argument("--src", required=True, help="path of the KuaiRand log.tsv")
    parser.add_argument("--out", required=True, help="output folder; gets impressions/ and events/")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(convert(args.src, args.out), indent=2))


if __name__ == "__main__":
    main()
