"""A table larger than one rank's memory budget, split column-wise over 2 CPU ranks.

The table has 30,000 rows of dimension 256 in fp32: 30.7 MB, while each rank's budget
is 0.03 GiB (32.2 MB) of which the planner may use 85% (27.4 MB) for tables. Half the
columns (15.4 MB) fit. row_wise is the usual split on GPU; the torchrec 1.8 planner
rejects it on CPU, so this runs column_wise.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from checkpoint_runs import REPO, TORCHRUN, write_data

ROWS = 30_000
DIM = 256
BUDGET_GIB = 0.03
TABLE = "ebc.embedding_bags.t_user.weight"

CONFIG = f"""
[[actions]]
name = "click"
attribution_window = "1h"

[[actions]]
name = "buy"
attribution_window = "1d"

[[sparse_features]]
name = "user"
column = "user_id"
num_embeddings = {ROWS}
embedding_dim = {DIM}

[split]
eval_days = 1

[training]
batch_size = 128
epochs = 1
checkpoint_every_steps = 0

[sharding]
memory_budget_gib = {BUDGET_GIB}
allowed_sharding_types = ["table_wise", "column_wise"]
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("large_table")
    data = write_data(root / "data", train_rows=1000, eval_rows=100)
    config = root / "config.toml"
    config.write_text(CONFIG)
    out = root / "out"
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "tests/large_table_worker.py", str(config), str(data), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"shards-rank{rank}.json").read_text()) for rank in (0, 1)]
    return {"ranks": ranks, "log": result.stderr}


def test_table_larger_than_budget():
    assert ROWS * DIM * 4 > BUDGET_GIB * 1024**3 * 0.85


def test_plan_is_column_wise_on_both_ranks(shards):
    row = next(row for row in shards["ranks"][0]["plan"] if row["table"] == "t_user")

    assert row["sharding_type"] == "column_wise"
    assert row["ranks"] == [0, 1]


def test_plan_logged_at_start(shards):
    assert "sharding plan:" in shards["log"]
    assert "column_wise" in shards["log"]


def test_each_rank_holds_half_the_columns(shards):
    for rank in (0, 1):
        local = shards["ranks"][rank]["tables"][TABLE]["local_shards"]
        assert shards["ranks"][rank]["tables"][TABLE]["shape"] == [ROWS, DIM]
        assert sum(shard["numel"] for shard in local) == ROWS * DIM // 2, f"rank {rank}"


def test_ranks_hold_different_columns(shards):
    offsets = [
        [tuple(shard["offsets"]) for shard in shards["ranks"][rank]["tables"][TABLE]["local_shards"]]
        for rank in (0, 1)
    ]

    assert set(offsets[0]).isdisjoint(offsets[1])
    assert sorted(offsets[0] + offsets[1]) == [(0, 0), (0, DIM // 2)]
