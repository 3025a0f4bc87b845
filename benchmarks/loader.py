"""Rows per second: raw pyarrow read, the native loader, and petastorm's BatchedDataLoader.

Run from the repository root (``make test`` creates .venv-petastorm)::

    .venv/bin/python benchmarks/loader.py --rows 2000000 --json runs/bench/loader.json

The dataset has 9 int64 id columns (impression_id and 8 sparse features), 8 float32 dense
columns, 4 int8 labels and a float64 weight, written in 64k-row row groups. Each figure is
one full pass over it, measured side by side in this run; the best of ``--repeats`` passes
is kept. Ratios are what to compare, because absolute rates depend on the machine and its
load. The petastorm figures come from a child process in ``--petastorm-python``, since
petastorm needs its own environment; without it they are reported as missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_SPARSE = 8
NUM_DENSE = 8
ACTIONS = ("click", "like", "share", "report")
ROW_GROUP_ROWS = 65_536
FILE_ROWS = 500_000


def generate(folder: Path, rows: int, seed: int = 0) -> None:
    """Write ``rows`` synthetic rows as Parquet files of up to FILE_ROWS rows under ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, first in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - first)
        columns = {"impression_id": pa.array(np.arange(first, first + n, dtype=np.int64))}
        for i in range(NUM_SPARSE):
            # Zipf-like ids up to about 10^7, so some exceed every table size.
            columns[f"id_{i}"] = pa.array(rng.zipf(1.2, n).astype(np.int64) % 10_000_000)
        for i in range(NUM_DENSE):
            columns[f"dense_{i}"] = pa.array(rng.lognormal(size=n).astype(np.float32))
        for action in ACTIONS:
            columns[f"label_{action}"] = pa.array((rng.random(n) < 0.05).astype(np.int8))
        columns["weight"] = pa.array(np.ones(n))
        pq.write_table(pa.table(columns), folder / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP_ROWS)


def config_dict(**training) -> dict:
    """Config for the generated data: 500k-row hashed tables, log1p dense features."""
    return {
        "actions": [{"name": a, "attribution_window": "1d"} for a in ACTIONS],
        "sparse_features": [
            {"name": f"id_{i}", "column": f"id_{i}", "num_embeddings": 500_000, "embedding_dim": 64}
            for i in range(NUM_SPARSE)
        ],
        "dense_features": [{"column": f"dense_{i}", "normalization": "log1p"} for i in range(NUM_DENSE)],
        "split": {"eval_days": 1},
        "training": training,
    }


def best_rate(measure, repeats: int) -> float:
    """Return the best rows-per-second of ``repeats`` calls of ``measure`` (which returns rows)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = measure()
        best = max(best, rows / (time.perf_counter() - start))
    return best


def measure_raw(folder: Path) -> int:
    return pq.read_table(folder).num_rows


def open_native(folder: Path, workers: int, shuffle: bool, buffer_rows: int):
    """Return (seconds to open the split, the native loader's SplitData)."""
    from trainer.loader import SplitData
    from valuerank.config import config_from_dict

    cfg = config_from_dict(config_dict(loader_workers=workers, shuffle=shuffle, shuffle_buffer_rows=buffer_rows))
    start = time.perf_counter()
    data = SplitData(folder, cfg)
    return time.perf_counter() - start, data


def measure_native(data, batch_size: int) -> int:
    """Rows of one epoch through the native loader, to ready batches (worker start-up included)."""
    rows = 0
    for batch in data.train_batches(0, 0, 1, batch_size, seed=0):
        rows += batch.batch_size
    return rows


def measure_petastorm(folder: Path, batch_size: int, queue_rows: int, workers: int) -> int:
    """Rows of one pass through petastorm.pytorch.BatchedDataLoader (runs in the petastorm environment)."""
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader

    urls = [f"file://{p.resolve()}" for p in sorted(folder.glob("*.parquet"))]
    fields = ["impression_id", *(f"id_{i}" for i in range(NUM_SPARSE)), *(f"dense_{i}" for i in range(NUM_DENSE)),
              *(f"label_{a}" for a in ACTIONS), "weight"]
    rows = 0
    with make_batch_reader(urls, schema_fields=fields, num_epochs=1, workers_count=workers,
                           shuffle_row_groups=queue_rows > 0, seed=0) as reader:
        loader = BatchedDataLoader(reader, batch_size=batch_size, shuffling_queue_capacity=queue_rows)
        for batch in loader:
            rows += len(batch["impression_id"])
    return rows


def petastorm_rates(python: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [python, __file__, "--petastorm-child", "--data", str(folder), "--batch-size", str(args.batch_size),
               "--repeats", str(args.repeats), "--shuffle-buffer-rows", str(args.shuffle_buffer_rows),
               "--petastorm-workers", str(args.petastorm_workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"petastorm measurement failed in {python}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the generated dataset")
    parser.add_argument("--data", type=Path, help="folder for the dataset (default: a temporary folder); reused if it has Parquet files")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per batch")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="native loader DataLoader workers (training.loader_workers; default: the config default, 0 on cpu)",
    )
    parser.add_argument("--shuffle-buffer-rows", type=int, default=100_000,
                        help="native shuffle buffer rows, also petastorm's shuffling_queue_capacity when shuffled")
    parser.add_argument("--petastorm-workers", type=int, default=2, help="petastorm reader threads")
    parser.add_argument("--repeats", type=int, default=2, help="passes per figure; the best is kept")
    parser.add_argument("--petastorm-python", default=str(ROOT / ".venv-petastorm" / "bin" / "python"),
                        help="interpreter of the petastorm environment")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--petastorm-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.petastorm_child:
        rates = {
            "petastorm_rows_per_s": best_rate(lambda: measure_petastorm(args.data, args.batch_size, 0, args.petastorm_workers), args.repeats),
            "petastorm_shuffled_rows_per_s": best_rate(
                lambda: measure_petastorm(args.data, args.batch_size, args.shuffle_buffer_rows, args.petastorm_workers), args.repeats
            ),
        }
        print(json.dumps(rates))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "data"
        if not list(folder.glob("*.parquet")):
            print(f"generating {args.rows:,} rows in {folder}", flush=True)
            generate(folder, args.rows)
        total_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))

        setup, plain = open_native(folder, args.workers, False, args.shuffle_buffer_rows)
        _, shuffled = open_native(folder, args.workers, True, args.shuffle_buffer_rows)
        plain_workers = plain.cfg.training.resolved_loader_workers
        figures: dict = {"rows": total_rows, "batch_size": args.batch_size, "loader_workers": plain_workers,
                         "shuffle_buffer_rows": args.shuffle_buffer_rows, "petastorm_workers": args.petastorm_workers}
        figures["raw_read_table_rows_per_s"] = best_rate(lambda: measure_raw(folder), args.repeats)
        figures["native_open_seconds"] = setup
        figures["native_rows_per_s"] = best_rate(lambda: measure_native(plain, args.batch_size), args.repeats)
        figures["native_shuffled_rows_per_s"] = best_rate(lambda: measure_native(shuffled, args.batch_size), args.repeats)

        python = Path(args.petastorm_python)
        if python.exists():
            figures.update(petastorm_rates(str(python), folder, args))
        else:
            print(f"petastorm environment not found at {python} (make petastorm-venv); petastorm figures missing")

        figures["native_to_raw"] = figures["native_rows_per_s"] / figures["raw_read_table_rows_per_s"]
        if "petastorm_rows_per_s" in figures:
            figures["native_to_petastorm"] = figures["native_rows_per_s"] / figures["petastorm_rows_per_s"]
            figures["native_shuffled_to_petastorm_shuffled"] = (
                figures["native_shuffled_rows_per_s"] / figures["petastorm_shuffled_rows_per_s"]
            )

    for key, value in figures.items():
        print(f"{key:40s} {value:,.3f}" if isinstance(value, float) else f"{key:40s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
