"""Tests of ``valuerank plan``: dry-run sharding plans for a CUDA cluster, planned on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torchrec.distributed.planner.types import PlannerError

from trainer.capacity import (
    ClusterSpec,
    ClusterSpecError,
    NoFittingPlanError,
    plan_cluster,
    plan_or_explain,
)
from valuerank import cli
from valuerank.config import load_config
from valuerank.plan import format_ranks, render

REPO = Path(__file__).resolve().parents[1]
MODEL_40_TABLES = REPO / "configs" / "production_40_tables.toml"
MODEL_10_TABLES = REPO / "configs" / "production_10x10m.toml"


@pytest.fixture(scope="module")
def production_plan():
    """The 40-table reference model (441.6 GiB of weights) on 2 nodes x 8 GPUs of 80 GiB."""
    cfg = load_config(MODEL_40_TABLES)
    cluster = ClusterSpec(nodes=2, gpus_per_node=8, hbm_gib=80, host_memory_gib=128, batch_size=8192)
    return cfg, plan_cluster(cfg, cluster)


def _storage_per_rank(plan, tier: str) -> dict[int, int]:
    """Sum one storage tier per rank from the planner's own shard storage estimates."""
    used: dict[int, int] = {}
    for option in plan.sharding_options:
        for shard in option.shards:
            used[shard.rank] = used.get(shard.rank, 0) + getattr(shard.storage, tier)
    return used


def test_production_plan_hbm_within_cap(production_plan):
    _, plan = production_plan
    available = int(0.85 * 80 * 1024**3)
    for rank, used in _storage_per_rank(plan, "hbm").items():
        assert used <= available, f"rank {rank} uses {used} bytes of HBM, more than the {available} available"


def test_production_plan_host_memory_within_cap(production_plan):
    _, plan = production_plan
    for rank, used in _storage_per_rank(plan, "ddr").items():
        assert used <= 128 * 1024**3, f"rank {rank} uses {used} bytes of host memory"


def test_production_plan_covers_every_table(production_plan):
    cfg, plan = production_plan
    assert [t.table for t in plan.tables] == [f"t_{f.name}" for f in cfg.sparse_features]


def test_production_plan_shards_cover_rows(production_plan):
    _, plan = production_plan
    for table in plan.tables:
        if table.sharding_type in ("row_wise", "table_row_wise"):
            assert sum(s["rows"] for s in table.shards) == table.rows, table.table


def test_production_plan_uses_every_rank(production_plan):
    _, plan = production_plan
    assert set(_storage_per_rank(plan, "hbm")) == set(range(16))


def test_rank_usage_matches_shard_storage(production_plan):
    _, plan = production_plan
    assert {r.rank: r.hbm_bytes for r in plan.ranks} == _storage_per_rank(plan, "hbm")


def test_step_time_is_slowest_rank(production_plan):
    _, plan = production_plan
    assert plan.estimate.step_time_ms == max(r.total_ms for r in plan.ranks)


def test_records_per_second_from_step_time(production_plan):
    _, plan = production_plan
    expected = 16 * 8192 / (plan.estimate.step_time_ms / 1000)
    assert plan.estimate.records_per_second == pytest.approx(expected)


def test_estimate_has_communication_cost(production_plan):
    _, plan = production_plan
    assert max(r.comms_ms for r in plan.ranks) > 0


def test_plan_json_serializable(production_plan):
    _, plan = production_plan
    data = json.loads(json.dumps(plan.to_dict()))
    assert len(data["ranks"]) == 16


def test_render_lists_every_table(production_plan):
    cfg, plan = production_plan
    text = render(plan.to_dict())
    for feature in cfg.sparse_features:
        assert f"t_{feature.name} " in text


def test_render_shows_estimate(production_plan):
    _, plan = production_plan
    assert "records/s across 16 ranks" in render(plan.to_dict())


def _smallest_nodes(message: str) -> int:
    match = re.search(r"smallest cluster of this kind that fits is (\d+) node\(s\)", message)
    assert match is not None, message
    return int(match.group(1))


def test_too_small_cluster_names_smallest_fit():
    # 10 tables of 10M x 128 (47.7 GiB with optimizer state) in HBM on 2 GPUs of 8 GiB.
    cfg = load_config(MODEL_10_TABLES)
    cluster = ClusterSpec(nodes=1, gpus_per_node=2, hbm_gib=8, batch_size=8192, hbm_only=True)
    with pytest.raises(NoFittingPlanError) as raised:
        plan_or_explain(cfg, cluster)
    nodes = _smallest_nodes(str(raised.value))

    # The named size fits, and one node fewer does not.
    assert plan_cluster(cfg, cluster.with_nodes(nodes)).cluster.nodes == nodes
    with pytest.raises(PlannerError):
        plan_cluster(cfg, cluster.with_nodes(nodes - 1))


def test_too_small_cluster_states_search_bounds():
    cfg = load_config(MODEL_10_TABLES)
    cluster = ClusterSpec(nodes=1, gpus_per_node=2, hbm_gib=8, batch_size=8192, hbm_only=True)
    with pytest.raises(NoFittingPlanError, match="searched 2 to 16 nodes"):
        plan_or_explain(cfg, cluster, max_nodes=16)


def test_unsplittable_table_fits_no_cluster():
    # table_wise keeps a 4.8 GiB table on one GPU, and 3.4 GiB of a 4 GiB GPU are available.
    cfg = load_config(MODEL_10_TABLES, ['sharding.allowed_sharding_types=["table_wise"]'])
    cluster = ClusterSpec(nodes=1, gpus_per_node=2, hbm_gib=4, batch_size=8192, hbm_only=True)
    with pytest.raises(NoFittingPlanError, match="No cluster of this kind fits .searched 2 to 4 nodes.*allow row_wise"):
        plan_or_explain(cfg, cluster, max_nodes=4)


def test_cli_reports_no_fit_with_status_2(capsys):
    args = [
        "plan", "--config", str(MODEL_10_TABLES), "--gpus-per-node", "2", "--hbm-gib", "8", "--hbm-only",
        "--max-nodes", "8",
    ]
    assert cli.main(args) == 2
    assert "smallest cluster of this kind that fits" in capsys.readouterr().err


def test_cli_find_smallest_reports_nodes(capsys, tmp_path):
    # 47.7 GiB of tables fit in the 68 GiB left on one 80 GiB GPU.
    out = tmp_path / "plan.json"
    args = [
        "plan", "--config", str(MODEL_10_TABLES), "--nodes", "4", "--gpus-per-node", "1", "--hbm-gib", "80",
        "--find-smallest", "--json", str(out),
    ]
    assert cli.main(args) == 0
    assert "smallest cluster of this kind that fits: 1 node(s) (1 GPUs)" in capsys.readouterr().out
    assert json.loads(out.read_text())["smallest_fitting_nodes"] == 1


def test_cli_rejects_full_reservation(capsys):
    assert cli.main(["plan", "--config", str(MODEL_10_TABLES), "--reserved-share", "1"]) == 2
    assert "--reserved-share must be in [0, 1)" in capsys.readouterr().err


def test_cluster_spec_rejects_zero_hbm():
    with pytest.raises(ClusterSpecError, match="--hbm-gib must be positive"):
        ClusterSpec(nodes=1, gpus_per_node=8, hbm_gib=0)


def _plan_json(tmp_path: Path, name: str, hash_seed: str) -> bytes:
    out = tmp_path / name
    command = [
        sys.executable, "-m", "valuerank.cli", "plan", "--config", str(MODEL_40_TABLES),
        "--nodes", "2", "--gpus-per-node", "8", "--json", str(out),
    ]
    # Different hash seeds change the iteration order of any set or dict keyed by strings.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True)
    return out.read_bytes()


def test_plan_json_same_on_every_run(tmp_path):
    first = _plan_json(tmp_path, "first.json", "1")
    second = _plan_json(tmp_path, "second.json", "2")
    assert first == second


def test_format_ranks_ranges():
    assert format_ranks([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
