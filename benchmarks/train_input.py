"""Training examples per second reading from Parquet versus from batches already in memory.

Run from the repository root::

    .venv/bin/python benchmarks/train_input.py --rows 2000000 --json runs/bench/train_input.json

One rank (gloo on CPU, nccl with ``--device cuda``) trains the multi-task model with the
trainer's own step: TrainingModel sharded by DistributedModelParallel and driven by
TrainPipelineSparseDist. The dataset is the one ``benchmarks/loader.py`` generates (8 hashed
tables of 500k x 64, 8 dense features, 4 actions). The model trains one epoch fed by the
native loader, then one epoch over the same number of batches held in memory.
``parquet_to_memory`` is the ratio of the two rates; near 1.0 the trainer is not input-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loader import config_dict, generate  # noqa: E402  (the sibling benchmark module)


def train_epoch(pipeline, batches) -> tuple[int, float]:
    """Run the pipeline over ``batches``; return (examples, seconds)."""
    examples = 0
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        try:
            output = pipeline.progress(iterator)
        except StopIteration:
            break
        examples += output.logits.shape[0]
    return examples, time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the generated dataset")
    parser.add_argument("--data", type=Path, help="folder for the dataset (default: a temporary folder); reused if it has Parquet files")
    parser.add_argument("--batch-size", type=int, default=4096, help="examples per step")
    parser.add_argument("--workers", type=int, default=1, help="native loader DataLoader workers (training.loader_workers)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="training device")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from trainer.loader import SplitData
    from trainer.sharding import shard_model
    from trainer.train import init_distributed
    from trainer.train_step import TrainingModel
    from valuerank.config import config_from_dict

    cfg = config_from_dict(
        {
            **config_dict(loader_workers=args.workers, batch_size=args.batch_size, device=args.device,
                          embedding_optimizer="adagrad"),
            "model": {"shared_layers": [256, 128], "tower_layers": [64]},
            "sharding": {"memory_budget_gib": 8.0},
        }
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "data"
        if not list(folder.glob("*.parquet")):
            print(f"generating {args.rows:,} rows in {folder}", flush=True)
            generate(folder, args.rows)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))

        rank, world_size, local_world_size, device = init_distributed(cfg)
        torch.manual_seed(0)
        model = TrainingModel(cfg, device=torch.device("meta"))
        dmp, optimizer, _ = shard_model(model, cfg, device, world_size, local_world_size)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
        data = SplitData(folder, cfg)

        # Warm-up, so that neither measurement pays for first-step allocations.
        warm = [b for _, b in zip(range(5), data.train_batches(9, rank, world_size, args.batch_size, seed=1))]
        train_epoch(pipeline, warm)

        parquet_examples, parquet_seconds = train_epoch(
            pipeline, data.train_batches(0, rank, world_size, args.batch_size, seed=0)
        )
        in_memory = list(data.train_batches(1, rank, world_size, args.batch_size, seed=0))
        memory_examples, memory_seconds = train_epoch(pipeline, in_memory)
        torch.distributed.destroy_process_group()

    figures = {
        "rows": rows,
        "batch_size": args.batch_size,
        "loader_workers": args.workers,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "parquet_examples_per_s": parquet_examples / parquet_seconds,
        "memory_examples_per_s": memory_examples / memory_seconds,
    }
    figures["parquet_to_memory"] = figures["parquet_examples_per_s"] / figures["memory_examples_per_s"]
    for key, value in figures.items():
        print(f"{key:28s} {value:,.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
