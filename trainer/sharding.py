"""Shard the model with the torchrec planner and DistributedModelParallel.

The per-rank memory budget from the config becomes the planner topology's device memory
(HBM on cuda, DDR on cpu), of which 85% may hold embedding tables, and ``sharding.allowed_sharding_types`` constrains every table.
On CPU with gloo the planner accepts table_wise, column_wise and data_parallel; it rejects
row_wise and table_row_wise there ("No available sharding type and compute kernel
combination"), so those are GPU-only choices.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.model import MultiTaskModel
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)

_EMBEDDING_OPTIMIZERS = {
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "sgd": torch.optim.SGD,
}
_GPU_ONLY = {"row_wise", "table_row_wise"}


class ShardingConfigError(ValueError):
    """The sharding settings cannot be planned on this device."""


def plan_sharding(model: MultiTaskModel, cfg: PipelineConfig, world_size: int, local_world_size: int) -> ShardingPlan:
    """Run the torchrec planner for the model's embedding tables on the configured topology."""
    device_type = cfg.training.device
    allowed = list(cfg.sharding.allowed_sharding_types)
    if device_type == "cpu":
        gpu_only = sorted(_GPU_ONLY & set(allowed))
        allowed = [kind for kind in allowed if kind not in _GPU_ONLY]
        if gpu_only:
            logger.info("skipping GPU-only sharding types on cpu: %s", ", ".join(gpu_only))
        if not allowed:
            raise ShardingConfigError(
                f"sharding.allowed_sharding_types = {cfg.sharding.allowed_sharding_types} has no type "
                "that plans on cpu; add table_wise, column_wise or data_parallel"
            )

    budget = int(cfg.sharding.memory_budget_gib * 1024**3)
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=device_type,
        hbm_cap=budget if device_type == "cuda" else None,
        ddr_cap=budget if device_type == "cpu" else None,
    )
    constraints = {
        f"t_{feature.name}": ParameterConstraints(sharding_types=allowed) for feature in cfg.sparse_features
    }
    # A fixed 15% of each rank's budget is kept for dense parameters, activations and input
    # buffers. torchrec's default heuristic estimates them from unmaterialised tensors, and
    # torchrec 1.8 warns that this estimate can be wrong.
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=cfg.training.batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(0.15),
        debug=False,
    )
    try:
        return planner.collective_plan(model, None, dist.GroupMember.WORLD)
    except PlannerError as error:
        splitting = "row_wise" if device_type == "cuda" else "column_wise"
        advice = "raise the budget or add ranks"
        if splitting not in allowed:
            advice += f", or allow {splitting}, which splits one table across ranks"
        elif device_type == "cpu":
            # torchrec 1.8 planner constant MIN_CW_DIM: column shards are at least 128 wide.
            advice += ", or use embedding_dim of at least 256 so that column_wise can split a table"
        raise ShardingConfigError(
            f"the embedding tables do not fit sharding.memory_budget_gib = {cfg.sharding.memory_budget_gib} "
            f"on {world_size} rank(s) with sharding types {allowed}: {error}. To fix it, {advice}"
        ) from error


def describe_plan(plan: ShardingPlan) -> list[dict]:
    """Return one row per table: name, sharding type, ranks and bytes per rank."""
    rows = []
    for module_plan in plan.plan.values():
        for table, parameter in module_plan.items():
            ranks = sorted(set(parameter.ranks or []))
            per_rank: dict[int, int] = {}
            if parameter.sharding_spec is not None:
                for shard in parameter.sharding_spec.shards:
                    size = 1
                    for dim in shard.shard_sizes:
                        size *= dim
                    rank = shard.placement.rank()
                    per_rank[rank] = per_rank.get(rank, 0) + size * 4
            rows.append(
                {
                    "table": table,
                    "sharding_type": parameter.sharding_type,
                    "ranks": ranks,
                    "bytes_per_rank": per_rank,
                }
            )
    return rows


def format_plan(rows: list[dict]) -> str:
    """Render the plan rows as a fixed-width text table for the log."""
    lines = [f"{'table':<24} {'sharding':<14} {'ranks':<12} bytes per rank (fp32 weights)"]
    for row in rows:
        ranks = ",".join(str(r) for r in row["ranks"]) or "all"
        sizes = ", ".join(f"{r}:{b}" for r, b in sorted(row["bytes_per_rank"].items())) or "replicated"
        lines.append(f"{row['table']:<24} {row['sharding_type']:<14} {ranks:<12} {sizes}")
    return "\n".join(lines)


def shard_model(
    model: MultiTaskModel, cfg: PipelineConfig, device: torch.device, world_size: int, local_world_size: int
) -> tuple[DistributedModelParallel, CombinedOptimizer, list[dict]]:
    """Wrap the model in DMP with a fused embedding optimizer and an Adam dense optimizer."""
    train = cfg.training
    optimizer_kwargs = {"lr": train.embedding_lr}
    _apply_optimizer_in_backward(_EMBEDDING_OPTIMIZERS[train.embedding_optimizer], model.ebc.parameters(), optimizer_kwargs)

    plan = plan_sharding(model, cfg, world_size, local_world_size)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)

    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=train.dense_lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return dmp, optimizer, describe_plan(plan)
