"""``valuerank plan``: a dry-run sharding plan of the config's model for a CUDA cluster.

Runs on any machine, GPU or not, because the model is built on the meta device:

    valuerank plan --config configs/production_40_tables.toml --nodes 8 --gpus-per-node 8 \\
        --hbm-gib 80 --host-memory-gib 128 --batch-size 8192 --json runs/plan.json

It prints the plan table, memory and estimated cost per rank and the estimated records
per second, and with ``--json`` writes the same as JSON. When the tables do not fit, it
exits with status 2 and a message naming the smallest cluster of the same kind that fits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from launch.local import positive_int
from valuerank.config import load_config

RANKS_SHOWN_IN_FULL = 32
"""Up to this many ranks, the text output lists every rank; above it, a summary and the busiest ranks."""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``valuerank plan``."""
    from trainer.capacity import (
        DEFAULT_MAX_NODES,
        DEFAULT_RESERVED_SHARE,
        TORCHREC_HBM_GIBPS,
        TORCHREC_HOST_MEMORY_GIB,
        TORCHREC_INTER_NODE_GIBPS,
        TORCHREC_INTRA_NODE_GIBPS,
    )

    parser = argparse.ArgumentParser(
        prog="valuerank plan",
        description="Plan the embedding sharding of the config's model for a CUDA cluster, without a GPU.",
    )
    parser.add_argument("--config", required=True, type=Path, help="pipeline config (TOML)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    parser.add_argument("--nodes", type=positive_int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node, one rank each (default 8)")
    parser.add_argument(
        "--hbm-gib", type=float, default=None,
        help="HBM per GPU in GiB (default: sharding.memory_budget_gib of the config, which the trainer plans with)",
    )
    parser.add_argument(
        "--host-memory-gib", type=float, default=TORCHREC_HOST_MEMORY_GIB,
        help=f"host memory per GPU in GiB that UVM-backed tables may use (default {TORCHREC_HOST_MEMORY_GIB:g}, torchrec's default)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None,
        help="examples per rank per step (default: training.batch_size of the config)",
    )
    parser.add_argument(
        "--intra-node-bandwidth", type=float, default=TORCHREC_INTRA_NODE_GIBPS, metavar="GIB_PER_S",
        help=f"GPU-to-GPU bandwidth inside a node in GiB/s (default {TORCHREC_INTRA_NODE_GIBPS:g}, torchrec's default)",
    )
    parser.add_argument(
        "--inter-node-bandwidth", type=float, default=TORCHREC_INTER_NODE_GIBPS, metavar="GIB_PER_S",
        help=f"network bandwidth per GPU between nodes in GiB/s (default {TORCHREC_INTER_NODE_GIBPS:g}, torchrec's default)",
    )
    parser.add_argument(
        "--hbm-bandwidth", type=float, default=TORCHREC_HBM_GIBPS, metavar="GIB_PER_S",
        help=f"HBM bandwidth per GPU in GiB/s (default {TORCHREC_HBM_GIBPS:g}, torchrec's default)",
    )
    parser.add_argument(
        "--reserved-share", type=float, default=DEFAULT_RESERVED_SHARE,
        help=f"share of HBM kept free of tables for dense layers, activations and inputs (default {DEFAULT_RESERVED_SHARE:g}, as in training)",
    )
    parser.add_argument(
        "--hbm-only", action="store_true",
        help="keep every table in HBM; by default the planner may hold tables in host memory with a UVM cache",
    )
    parser.add_argument(
        "--max-nodes", type=positive_int, default=DEFAULT_MAX_NODES,
        help=f"upper bound of the smallest-cluster search in nodes (default {DEFAULT_MAX_NODES})",
    )
    parser.add_argument(
        "--find-smallest", action="store_true",
        help="also search for the fewest nodes that fit, when the requested cluster fits",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the plan as JSON to PATH")
    return parser


def main(argv: list[str]) -> int:
    """Run ``valuerank plan``; return 2 with a one-line error when the tables do not fit."""
    from trainer.capacity import ClusterSpec, ClusterSpecError, NoFittingPlanError, plan_or_explain, smallest_fitting_cluster

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.override)
    try:
        cluster = ClusterSpec(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            hbm_gib=args.hbm_gib if args.hbm_gib is not None else cfg.sharding.memory_budget_gib,
            host_memory_gib=args.host_memory_gib,
            batch_size=args.batch_size if args.batch_size is not None else cfg.training.batch_size,
            intra_node_bandwidth_gibps=args.intra_node_bandwidth,
            inter_node_bandwidth_gibps=args.inter_node_bandwidth,
            hbm_bandwidth_gibps=args.hbm_bandwidth,
            reserved_share=args.reserved_share,
            hbm_only=args.hbm_only,
        )
        plan = plan_or_explain(cfg, cluster, args.max_nodes)
    except (ClusterSpecError, NoFittingPlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    report = {"config": str(args.config), "overrides": list(args.override), **plan.to_dict()}
    if args.find_smallest:
        # The requested size fits, so the search up to it always ends with a plan.
        smallest = smallest_fitting_cluster(cfg, cluster, cluster.nodes)
        report["smallest_fitting_nodes"] = smallest.cluster.nodes if smallest else None
    print(render(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"plan written to {args.json}")
    return 0


def format_ranks(ranks: list[int]) -> str:
    """Write sorted rank numbers as ranges, e.g. ``0-7,16``."""
    parts: list[str] = []
    start = previous = None
    for rank in ranks:
        if previous is not None and rank == previous + 1:
            previous = rank
            continue
        if start is not None:
            parts.append(f"{start}" if start == previous else f"{start}-{previous}")
        start = previous = rank
    if start is not None:
        parts.append(f"{start}" if start == previous else f"{start}-{previous}")
    return ",".join(parts)


def _gib(value: float) -> str:
    return f"{value / 1024**3:.2f}"


def render(report: dict) -> str:
    """Render the plan report as text: cluster, plan table, memory and cost per rank, estimate."""
    cluster = report["cluster"]
    lines = [
        f"cluster: {cluster['nodes']} node(s) x {cluster['gpus_per_node']} GPUs = {cluster['world_size']} ranks (compute device cuda); "
        f"HBM {cluster['hbm_gib']:g} GiB per GPU with {cluster['reserved_share']:.0%} reserved; "
        f"host memory {cluster['host_memory_gib']:g} GiB per GPU; batch size {cluster['batch_size']} per rank",
        f"bandwidth (GiB/s): intra-node {cluster['intra_node_bandwidth_gibps']:g}, inter-node "
        f"{cluster['inter_node_bandwidth_gibps']:g}, HBM {cluster['hbm_bandwidth_gibps']:g}"
        + ("; tables kept in HBM (--hbm-only)" if cluster["hbm_only"] else ""),
        "",
        f"{'table':<20} {'rows':>12} {'dim':>5} {'sharding':<15} {'kernel':<18} ranks",
    ]
    for table in report["tables"]:
        lines.append(
            f"{table['table']:<20} {table['rows']:>12} {table['dimension']:>5} {table['sharding_type']:<15} "
            f"{table['compute_kernel']:<18} {format_ranks(table['ranks'])}"
        )

    ranks = report["ranks"]
    first = ranks[0]
    lines += [
        "",
        f"memory per rank (GiB): HBM cap {_gib(first['hbm_cap_bytes'])}, reserved {_gib(first['hbm_reserved_bytes'])}, "
        f"available for tables {_gib(first['hbm_available_bytes'])}; host memory cap {_gib(first['ddr_cap_bytes'])}",
        "estimated cost per step (ms, torchrec planner)",
        f"{'rank':>5} {'HBM GiB':>8} {'HBM %':>6} {'host GiB':>9} {'compute':>8} {'comms':>8} {'total':>8}",
    ]
    listed_ranks = ranks
    if len(ranks) > RANKS_SHOWN_IN_FULL:
        listed_ranks = sorted(ranks, key=lambda r: (-r["total_ms"], r["rank"]))[:5]
        lines.append(f"(the 5 ranks with the highest total of {len(ranks)}; every rank is in --json)")
    for rank in listed_ranks:
        lines.append(_rank_line(str(rank["rank"]), rank))
    if len(ranks) > 1:
        lines.append(_rank_line("max", {key: max(r[key] for r in ranks) for key in _RANK_KEYS}))
        lines.append(_rank_line("mean", {key: statistics.fmean(r[key] for r in ranks) for key in _RANK_KEYS}))

    estimate = report["estimate"]
    dense = report["dense"]
    lines += [
        "",
        f"dense layers: {dense['parameters']} parameters, {_gib(dense['bytes_with_adam_state'])} GiB per rank "
        "with Adam state (inside the reserved share)",
        f"estimated step time {estimate['step_time_ms']:.3f} ms (rank {estimate['bottleneck_rank']}), "
        f"{estimate['records_per_second']:,.0f} records/s across {cluster['world_size']} ranks",
        f"estimate covers {estimate['scope']}",
    ]
    if report.get("smallest_fitting_nodes") is not None:
        nodes = report["smallest_fitting_nodes"]
        lines.append(f"smallest cluster of this kind that fits: {nodes} node(s) ({nodes * cluster['gpus_per_node']} GPUs)")
    return "\n".join(lines)


_RANK_KEYS = ("hbm_bytes", "hbm_available_bytes", "ddr_bytes", "compute_ms", "comms_ms", "total_ms")


def _rank_line(label: str, rank: dict) -> str:
    share = rank["hbm_bytes"] / rank["hbm_available_bytes"] if rank["hbm_available_bytes"] else 0.0
    return (
        f"{label:>5} {_gib(rank['hbm_bytes']):>8} {share:>6.0%} {_gib(rank['ddr_bytes']):>9} "
        f"{rank['compute_ms']:>8.3f} {rank['comms_ms']:>8.3f} {rank['total_ms']:>8.3f}"
    )
