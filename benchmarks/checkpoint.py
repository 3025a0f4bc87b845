"""Measure checkpoint save and load time, checkpoint size against model size, and peak memory per rank.

    python benchmarks/checkpoint.py --ranks 2 --tables 4 --rows 200000 --dim 64 --json runs/bench/checkpoint.json

The script starts itself under ``torchrun --standalone`` with ``--ranks`` CPU ranks (gloo).
Each rank shards the model with DistributedModelParallel, trains one step so that every
optimizer state exists, then saves and loads with trainer.checkpoint ``--repeats`` times.
Times are medians over the repeats. ``checkpoint_bytes_to_model_bytes`` is the size of one
checkpoint folder on disk over the fp32 size of the unsharded model (embedding tables and
dense layers). It exceeds 1 by the optimizer state, because row-wise Adagrad keeps one
value per table row and Adam two per dense weight. Peak memory is each rank's maximum resident set
size (``ru_maxrss``), before the first save and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks started by torchrun")
    parser.add_argument("--tables", type=int, default=4, help="embedding tables")
    parser.add_argument("--rows", type=int, default=200_000, help="rows per table")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads to time")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows of the one training step")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _config(args: argparse.Namespace):
    from valuerank.config import config_from_dict

    return config_from_dict(
        {
            "actions": [{"name": "click", "attribution_window": "1h"}, {"name": "buy", "attribution_window": "1d"}],
            "sparse_features": [
                {"name": f"f{i}", "column": f"c{i}", "num_embeddings": args.rows, "embedding_dim": args.dim}
                for i in range(args.tables)
            ],
            "split": {"eval_days": 1},
            "training": {"batch_size": args.batch_size},
            "sharding": {"memory_budget_gib": 64.0},
        }
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def _folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def worker(args: argparse.Namespace) -> None:
    """Run on every rank under torchrun; rank 0 writes ``result.json`` into the work folder."""
    import torch
    import torch.distributed as dist
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from trainer.checkpoint import CheckpointManager, TrainingPosition
    from trainer.model import MultiTaskModel
    from trainer.sharding import shard_model

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    cfg = _config(args)
    dmp, optimizer, plan = shard_model(MultiTaskModel(cfg, device=torch.device("meta")), cfg, torch.device("cpu"), world_size, world_size)
    model_bytes = sum(p.numel() * 4 for p in MultiTaskModel(cfg, device=torch.device("meta")).parameters())

    # One training step, so that the dense Adam state exists like in a real run.
    batch = args.batch_size
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in cfg.sparse_features],
        values=torch.randint(0, args.rows, (batch * args.tables,)),
        lengths=torch.ones(batch * args.tables, dtype=torch.int32),
    )
    logits = dmp(torch.zeros(batch, 0), sparse)
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    optimizer.step()
    before = _peak_rss_mib()

    manager = CheckpointManager(args.workdir, keep_last=1, rank=rank, world_size=world_size)
    save_seconds, load_seconds = [], []
    for repeat in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        path = manager.save(dmp, optimizer, TrainingPosition(step=repeat + 1), {"config": {}})
        save_seconds.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        manager.load(path, dmp, optimizer)
        dist.barrier()
        load_seconds.append(time.perf_counter() - start)

    peaks: list = [None] * world_size
    dist.all_gather_object(peaks, (before, _peak_rss_mib()))
    if rank == 0:
        checkpoint_bytes = _folder_bytes(path)
        save = statistics.median(save_seconds)
        result = {
            "ranks": world_size,
            "tables": args.tables,
            "rows_per_table": args.rows,
            "embedding_dim": args.dim,
            "sharding_types": sorted({row["sharding_type"] for row in plan}),
            "model_bytes": model_bytes,
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_bytes_to_model_bytes": checkpoint_bytes / model_bytes,
            "save_seconds": save,
            "load_seconds": statistics.median(load_seconds),
            "save_mib_per_second": checkpoint_bytes / 2**20 / save,
            "save_seconds_all": save_seconds,
            "load_seconds_all": load_seconds,
            "peak_rss_before_checkpoint_mib_per_rank": [round(p[0], 1) for p in peaks],
            "peak_rss_mib_per_rank": [round(p[1], 1) for p in peaks],
        }
        (args.workdir / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="valuerank-checkpoint-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [
            str(torchrun), "--standalone", "--nproc-per-node", str(args.ranks), __file__, "--worker",
            "--tables", str(args.tables), "--rows", str(args.rows), "--dim", str(args.dim),
            "--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--workdir", str(workdir),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(command, check=True, env=env)
        result = json.loads((workdir / "result.json").read_text())

    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
