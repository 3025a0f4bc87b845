"""Dry-run sharding plans for a CUDA cluster, computed on any machine.

The model is built on the meta device, so no table is allocated, and the torchrec
planner plans it for a CUDA topology that describes the target cluster. Sharding types
that are GPU-only (row_wise, table_row_wise) and the UVM kernels are therefore
considered even on a CPU machine. The planner's storage and cost estimates of every
shard are collected into per-table and per-rank figures.

Example::

    cluster = ClusterSpec(nodes=8, gpus_per_node=8, hbm_gib=80, host_memory_gib=128, batch_size=8192)
    plan = plan_cluster(load_config("configs/production_40_tables.toml"), cluster)
    plan.estimate.records_per_second
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    PlannerError,
    ShardingOption,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import get_default_sharders

from trainer.model import MultiTaskModel
from trainer.sharding import _EMBEDDING_OPTIMIZERS
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)

GIB = 1024**3
BYTES_PER_MS_PER_GIBPS = GIB / 1000
"""Bytes per millisecond in one GiB/s, because torchrec expresses bandwidths in bytes per millisecond."""

# Defaults of torchrec 1.8 (torchrec/distributed/planner/constants.py), in GiB/s.
TORCHREC_INTRA_NODE_GIBPS = 600.0
TORCHREC_INTER_NODE_GIBPS = 12.5
TORCHREC_HBM_GIBPS = 897.0
TORCHREC_HOST_MEMORY_GIB = 128.0

DEFAULT_RESERVED_SHARE = 0.15
"""Share of each GPU's HBM kept free of tables, the same as the trainer's planner uses."""

HBM_ONLY_KERNELS = ["fused", "dense"]
"""Compute kernels that keep a table entirely in HBM (``dense`` is the data_parallel kernel)."""

DEFAULT_MAX_NODES = 128
"""Upper bound of the smallest-cluster search, in nodes."""


class ClusterSpecError(ValueError):
    """Invalid target cluster; the message names the option and the fix."""


class NoFittingPlanError(ValueError):
    """The model does not fit the target cluster. The message names the smallest cluster that fits, if one was found."""


@dataclass(frozen=True)
class ClusterSpec:
    """A homogeneous GPU cluster: every node has the same GPUs, and every rank drives one GPU."""

    nodes: int
    """Number of nodes."""

    gpus_per_node: int
    """GPUs (ranks) per node, also torchrun's ``--nproc-per-node``."""

    hbm_gib: float
    """HBM per GPU, in GiB."""

    host_memory_gib: float = TORCHREC_HOST_MEMORY_GIB
    """Host (DDR) memory per GPU that UVM-backed tables may use, in GiB."""

    batch_size: int = 8192
    """Examples per rank per step."""

    intra_node_bandwidth_gibps: float = TORCHREC_INTRA_NODE_GIBPS
    """GPU-to-GPU bandwidth inside a node (NVLink), in GiB/s."""

    inter_node_bandwidth_gibps: float = TORCHREC_INTER_NODE_GIBPS
    """Network bandwidth per GPU between nodes, in GiB/s."""

    hbm_bandwidth_gibps: float = TORCHREC_HBM_GIBPS
    """HBM bandwidth per GPU, in GiB/s. The planner's lookup cost is proportional to its inverse."""

    reserved_share: float = DEFAULT_RESERVED_SHARE
    """Share of HBM kept for dense parameters, activations and input buffers."""

    hbm_only: bool = False
    """Keep every table in HBM: exclude the UVM kernels, which hold a table in host memory."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "batch_size"):
            if getattr(self, name) < 1:
                raise ClusterSpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in (
            "hbm_gib",
            "host_memory_gib",
            "intra_node_bandwidth_gibps",
            "inter_node_bandwidth_gibps",
            "hbm_bandwidth_gibps",
        ):
            if not getattr(self, name) > 0:
                option = name.removesuffix("_gibps").replace("_", "-")
                raise ClusterSpecError(f"--{option} must be positive, got {getattr(self, name)}")
        if not 0 <= self.reserved_share < 1:
            raise ClusterSpecError(f"--reserved-share must be in [0, 1), got {self.reserved_share}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GIB)

    @property
    def host_memory_bytes(self) -> int:
        return int(self.host_memory_gib * GIB)

    def with_nodes(self, nodes: int) -> ClusterSpec:
        """Return the same cluster with ``nodes`` nodes."""
        return dataclasses.replace(self, nodes=nodes)

    def describe(self) -> str:
        """Describe the cluster in one line, for messages."""
        return (
            f"{self.nodes} node(s) x {self.gpus_per_node} GPUs = {self.world_size} GPUs with "
            f"{self.hbm_gib:g} GiB HBM and {self.host_memory_gib:g} GiB host memory per GPU"
        )


@dataclass
class TablePlan:
    """Placement of one embedding table by the planner."""

    table: str
    rows: int
    dimension: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shards: list[dict]
    """One entry per shard: rank, rows, columns, row and column offset, hbm_bytes, ddr_bytes."""


@dataclass
class RankUsage:
    """Memory and estimated cost of the shards on one rank.

    Costs are the planner's estimates in milliseconds per training step. They cover the
    embedding lookups, their backward pass and optimizer update, and the all-to-all or
    reduce-scatter that moves their inputs and pooled outputs.
    """

    rank: int
    hbm_bytes: int = 0
    ddr_bytes: int = 0
    fwd_compute_ms: float = 0.0
    bwd_compute_ms: float = 0.0
    fwd_comms_ms: float = 0.0
    bwd_comms_ms: float = 0.0
    input_dist_comms_ms: float = 0.0
    prefetch_compute_ms: float = 0.0

    @property
    def compute_ms(self) -> float:
        return self.fwd_compute_ms + self.bwd_compute_ms + self.prefetch_compute_ms

    @property
    def comms_ms(self) -> float:
        return self.fwd_comms_ms + self.bwd_comms_ms

    @property
    def total_ms(self) -> float:
        """The planner's per-rank cost (torchrec ``Perf.total``), which leaves out input_dist_comms."""
        return self.compute_ms + self.comms_ms


@dataclass
class ThroughputEstimate:
    step_time_ms: float
    """Largest per-rank total cost: the ranks wait for each other in every all-to-all."""

    bottleneck_rank: int
    records_per_second: float
    """world_size x batch_size / step time."""

    scope: str = (
        "embedding lookups, their backward pass and their communication only, as estimated by the "
        "torchrec planner; the dense layers, the DDP all-reduce and input loading are not included, "
        "so the real step is longer and the real rate lower"
    )


@dataclass
class CapacityPlan:
    """The planner's result for one config on one cluster."""

    cluster: ClusterSpec
    tables: list[TablePlan]
    ranks: list[RankUsage]
    estimate: ThroughputEstimate
    dense_parameters: int
    """Parameters of the shared layers and towers, replicated on every rank by DDP."""

    sharding_options: list[ShardingOption] = field(repr=False, default_factory=list)
    """The planner's chosen options, with ``shards[i].storage`` and ``shards[i].perf`` as torchrec computed them."""

    @property
    def hbm_available_bytes(self) -> int:
        """HBM per rank that tables may use after the reservation."""
        return int((1 - self.cluster.reserved_share) * self.cluster.hbm_bytes)

    def to_dict(self) -> dict:
        """Return the plan as plain data, for JSON. Every value depends only on the config and the cluster."""
        cluster = self.cluster
        reserved = cluster.hbm_bytes - self.hbm_available_bytes
        return {
            "cluster": {**dataclasses.asdict(cluster), "world_size": cluster.world_size},
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "ranks": [
                {
                    "rank": r.rank,
                    "hbm_bytes": r.hbm_bytes,
                    "hbm_cap_bytes": cluster.hbm_bytes,
                    "hbm_reserved_bytes": reserved,
                    "hbm_available_bytes": self.hbm_available_bytes,
                    "ddr_bytes": r.ddr_bytes,
                    "ddr_cap_bytes": cluster.host_memory_bytes,
                    "fwd_compute_ms": r.fwd_compute_ms,
                    "bwd_compute_ms": r.bwd_compute_ms,
                    "fwd_comms_ms": r.fwd_comms_ms,
                    "bwd_comms_ms": r.bwd_comms_ms,
                    "input_dist_comms_ms": r.input_dist_comms_ms,
                    "prefetch_compute_ms": r.prefetch_compute_ms,
                    "compute_ms": r.compute_ms,
                    "comms_ms": r.comms_ms,
                    "total_ms": r.total_ms,
                }
                for r in self.ranks
            ],
            "estimate": dataclasses.asdict(self.estimate),
            "dense": {
                "parameters": self.dense_parameters,
                "bytes_with_adam_state": self.dense_parameters * 4 * 3,
            },
        }


def build_topology(cluster: ClusterSpec) -> Topology:
    """Build the torchrec topology of ``cluster`` for compute device cuda."""
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=cluster.world_size,
            local_world_size=cluster.gpus_per_node,
            hbm_cap_bytes=cluster.hbm_bytes,
            ddr_cap_bytes=cluster.host_memory_bytes,
        ),
        hardware_config=HardwareConfig(
            intra_host_bw=cluster.intra_node_bandwidth_gibps * BYTES_PER_MS_PER_GIBPS,
            inter_host_bw=cluster.inter_node_bandwidth_gibps * BYTES_PER_MS_PER_GIBPS,
            hbm_mem_bw=cluster.hbm_bandwidth_gibps * BYTES_PER_MS_PER_GIBPS,
        ),
        # use_hardware_based_bandwidth makes the factory take the bandwidths above
        # instead of its built-in defaults.
        kernel_config=KernelConfig(compute_device="cuda", use_hardware_based_bandwidth=True),
    )


def build_meta_model(cfg: PipelineConfig) -> MultiTaskModel:
    """Build the model with its tables on the meta device and the trainer's fused embedding optimizer.

    The optimizer matters for planning: torchrec adds its state (one value per element
    for Adagrad, one per row for row-wise Adagrad) to each shard's storage.
    """
    model = MultiTaskModel(cfg, device=torch.device("meta"))
    optimizer_class = _EMBEDDING_OPTIMIZERS[cfg.training.embedding_optimizer]
    _apply_optimizer_in_backward(optimizer_class, model.ebc.parameters(), {"lr": cfg.training.embedding_lr})
    return model


def plan_cluster(cfg: PipelineConfig, cluster: ClusterSpec, model: MultiTaskModel | None = None) -> CapacityPlan:
    """Plan the config's embedding tables for ``cluster`` and collect memory and cost per table and rank.

    Raise PlannerError (torchrec) when the tables do not fit; ``plan_or_explain``
    turns that into a message naming the smallest cluster that fits.
    """
    model = model if model is not None else build_meta_model(cfg)
    constraints = {
        f"t_{feature.name}": ParameterConstraints(
            sharding_types=list(cfg.sharding.allowed_sharding_types),
            compute_kernels=list(HBM_ONLY_KERNELS) if cluster.hbm_only else None,
        )
        for feature in cfg.sparse_features
    }

    # The planner hands its best plan to each callback; this one keeps a reference.
    chosen: list[ShardingOption] = []

    def keep_options(options: list[ShardingOption]) -> list[ShardingOption]:
        chosen[:] = options
        return options

    planner = EmbeddingShardingPlanner(
        topology=build_topology(cluster),
        batch_size=cluster.batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(cluster.reserved_share),
        stats=[],
        callbacks=[keep_options],
        debug=False,
    )
    planner.plan(model, get_default_sharders())

    dense_parameters = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("ebc."))
    table_order = [f"t_{feature.name}" for feature in cfg.sparse_features]
    return summarize(cluster, chosen, dense_parameters, table_order)


def summarize(
    cluster: ClusterSpec, options: list[ShardingOption], dense_parameters: int, table_order: list[str]
) -> CapacityPlan:
    """Turn the planner's chosen sharding options into per-table and per-rank figures, tables in ``table_order``."""
    ranks = [RankUsage(rank) for rank in range(cluster.world_size)]
    tables = []
    position = {name: i for i, name in enumerate(table_order)}
    for option in sorted(options, key=lambda o: (position.get(o.name, len(position)), o.name)):
        shards = []
        for shard in option.shards:
            usage = ranks[shard.rank]
            usage.hbm_bytes += shard.storage.hbm
            usage.ddr_bytes += shard.storage.ddr
            usage.fwd_compute_ms += shard.perf.fwd_compute
            usage.bwd_compute_ms += shard.perf.bwd_compute
            usage.fwd_comms_ms += shard.perf.fwd_comms
            usage.bwd_comms_ms += shard.perf.bwd_comms
            usage.input_dist_comms_ms += shard.perf.input_dist_comms
            usage.prefetch_compute_ms += shard.perf.prefetch_compute
            shards.append(
                {
                    "rank": shard.rank,
                    "rows": shard.size[0],
                    "columns": shard.size[1],
                    "row_offset": shard.offset[0],
                    "column_offset": shard.offset[1],
                    "hbm_bytes": shard.storage.hbm,
                    "ddr_bytes": shard.storage.ddr,
                }
            )
        rows, dimension = option.tensor.shape
        tables.append(
            TablePlan(
                table=option.name,
                rows=int(rows),
                dimension=int(dimension),
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                ranks=sorted({shard["rank"] for shard in shards}),
                shards=shards,
            )
        )

    bottleneck = max(ranks, key=lambda r: (r.total_ms, -r.rank))
    step_ms = bottleneck.total_ms
    records = cluster.world_size * cluster.batch_size / (step_ms / 1000) if step_ms > 0 else float("inf")
    estimate = ThroughputEstimate(step_time_ms=step_ms, bottleneck_rank=bottleneck.rank, records_per_second=records)
    return CapacityPlan(cluster, tables, ranks, estimate, dense_parameters, sharding_options=list(options))


def fits(cfg: PipelineConfig, cluster: ClusterSpec, model: MultiTaskModel) -> CapacityPlan | None:
    """Return the plan for ``cluster``, or None when the planner finds none."""
    try:
        return plan_cluster(cfg, cluster, model)
    except PlannerError as error:
        logger.info("no plan on %s: %s", cluster.describe(), str(error).splitlines()[0].strip())
        return None


def smallest_fitting_cluster(
    cfg: PipelineConfig,
    cluster: ClusterSpec,
    max_nodes: int = DEFAULT_MAX_NODES,
    model: MultiTaskModel | None = None,
    failed_nodes: int = 0,
) -> CapacityPlan | None:
    """Find the fewest nodes of ``cluster``'s kind, from ``failed_nodes + 1`` to ``max_nodes``, on which the tables fit.

    ``failed_nodes`` is a node count already known not to fit (0 for none). The search
    doubles the node count until a plan is found, then bisects between the last size
    that failed and the first that fitted, so it plans about 2 log2(nodes) times. Bisection assumes that a model that fits on n nodes also fits on more.
    The torchrec planner's storage checks behave so, but its greedy partitioner does
    not guarantee it, so a smaller size that was never tried could fit in rare cases.
    The returned plan was computed at the size it reports. Returns None when
    ``max_nodes`` nodes do not fit.
    """
    if max_nodes < 1:
        raise ClusterSpecError(f"--max-nodes must be at least 1, got {max_nodes}")
    model = model if model is not None else build_meta_model(cfg)

    # Double until a plan is found.
    if failed_nodes >= max_nodes:
        return None
    failed, nodes, found = failed_nodes, min(max(1, 2 * failed_nodes), max_nodes), None
    while found is None:
        found = fits(cfg, cluster.with_nodes(nodes), model)
        if found is not None:
            break
        if nodes == max_nodes:
            return None
        failed, nodes = nodes, min(nodes * 2, max_nodes)

    # Bisect between the largest failure and the smallest success.
    fitted = nodes
    while fitted - failed > 1:
        middle = (failed + fitted) // 2
        plan = fits(cfg, cluster.with_nodes(middle), model)
        if plan is None:
            failed = middle
        else:
            fitted, found = middle, plan
    return found


def plan_or_explain(cfg: PipelineConfig, cluster: ClusterSpec, max_nodes: int = DEFAULT_MAX_NODES) -> CapacityPlan:
    """Plan for ``cluster``; if the tables do not fit, raise NoFittingPlanError naming the smallest cluster that does."""
    model = build_meta_model(cfg)
    try:
        return plan_cluster(cfg, cluster, model)
    except PlannerError as error:
        reason = str(error).splitlines()[0].strip().rstrip(".")

    largest_table = max(cfg.sparse_features, key=lambda f: f.num_embeddings * f.embedding_dim)
    smallest = smallest_fitting_cluster(cfg, cluster, max_nodes, model, failed_nodes=cluster.nodes)
    searched = f"searched {cluster.nodes + 1} to {max_nodes} nodes" if cluster.nodes < max_nodes else "no larger size searched"
    message = (
        f"the embedding tables do not fit {cluster.describe()}, "
        f"{cluster.reserved_share:.0%} of HBM reserved, batch size {cluster.batch_size} per rank "
        f"(torchrec planner: {reason})."
    )
    if smallest is not None:
        found = smallest.cluster
        peak = max(r.hbm_bytes for r in smallest.ranks)
        raise NoFittingPlanError(
            f"{message} The smallest cluster of this kind that fits is {found.nodes} node(s) x "
            f"{found.gpus_per_node} GPUs = {found.world_size} GPUs ({searched}; "
            f"largest HBM use {peak / GIB:.1f} of {smallest.hbm_available_bytes / GIB:.1f} GiB per rank). "
            f"Run with --nodes {found.nodes}, or use GPUs with more HBM."
        )
    advice = "raise --max-nodes, use GPUs with more HBM"
    if "row_wise" not in cfg.sharding.allowed_sharding_types:
        advice += ", allow row_wise in sharding.allowed_sharding_types so that one table can span GPUs"
    raise NoFittingPlanError(
        f"{message} No cluster of this kind fits ({searched}). To fix it, {advice}, or shrink the largest "
        f"table ({largest_table.name}: {largest_table.num_embeddings} rows x {largest_table.embedding_dim})."
    )
