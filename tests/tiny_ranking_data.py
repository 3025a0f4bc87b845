"""Tiny downsampled splits with learnable labels, shared by the model, baseline and sweep tests.

Three actions (click, like, hate with value weights 1, 5 and -50), user and item ids, an hour
feature and timestamps over several days, in the layout of the downsample job's output.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CONFIG = """
[[actions]]
name = "click"
attribution_window = "1h"
value_weight = 1.0

[[actions]]
name = "like"
attribution_window = "1h"
value_weight = 5.0

[[actions]]
name = "hate"
attribution_window = "1h"
value_weight = -50.0

[[sparse_features]]
name = "user"
column = "user_id"
num_embeddings = 64
embedding_dim = 4

[[sparse_features]]
name = "item"
column = "item_id"
num_embeddings = 128
embedding_dim = 4

[[dense_features]]
column = "hour"
normalization = "standard"

[split]
eval_days = 1

[model]
shared_layers = [16]
tower_layers = [8]
num_experts = 3
expert_layers = [8]

[training]
batch_size = 64
epochs = 2
dense_lr = 0.01
log_every = 5

[sharding]
memory_budget_gib = 1.0
allowed_sharding_types = ["table_wise"]
"""

START = datetime(2022, 4, 1, tzinfo=timezone.utc)


def _split_table(n: int, first_day: int, days: int, seed: int, id_offset: int) -> pa.Table:
    """Rows whose labels depend on the user and the item, so that every model can learn them."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, n)
    items = rng.integers(0, 60, n)
    hour = rng.integers(0, 24, n)
    user_taste = np.sin(users * 1.7)
    item_quality = np.cos(items * 0.9)
    click = rng.random(n) < 1 / (1 + np.exp(-(user_taste + item_quality)))
    like = rng.random(n) < 1 / (1 + np.exp(-(2 * item_quality + user_taste - 0.5)))
    hate = ~like & (rng.random(n) < 0.5)
    seconds = rng.integers(first_day * 86_400, (first_day + days) * 86_400, n)
    timestamps = [START + timedelta(seconds=int(s)) for s in seconds]
    return pa.table(
        {
            "impression_id": pa.array(np.arange(n) + id_offset, pa.int64()),
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "timestamp": pa.array(timestamps, pa.timestamp("us", tz="UTC")),
            "hour": pa.array(hour, pa.int64()),
            "label_click": pa.array(click.astype(np.int8)),
            "label_like": pa.array(like.astype(np.int8)),
            "label_hate": pa.array(hate.astype(np.int8)),
            "stratum": pa.array(["mixed"] * n),
            "keep_rate": pa.array(np.ones(n)),
            "weight": pa.array(np.ones(n)),
        }
    )


def write_splits(root: Path, train_rows: int = 600, eval_rows: int = 200) -> Path:
    """Write ``root/data/{train,eval}`` and a manifest with keep rates of 1; return ``root/data``."""
    data = root / "data"
    for split, table in (
        ("train", _split_table(train_rows, first_day=0, days=4, seed=1, id_offset=0)),
        ("eval", _split_table(eval_rows, first_day=4, days=1, seed=2, id_offset=100_000)),
    ):
        (data / split).mkdir(parents=True)
        pq.write_table(table, data / split / "part-0.parquet")
    rates = {action: {"__all__": {"positive": 1.0, "negative": 1.0}} for action in ("click", "like", "hate")}
    (data / "_manifest.json").write_text(json.dumps({"job": "downsample", "action_keep_rates": rates}))
    return data


def write_config(root: Path, extra: str = "") -> Path:
    path = root / "config.toml"
    path.write_text(CONFIG + extra)
    return path
