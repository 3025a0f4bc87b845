"""Checks that run once in the launcher, before torchrun starts the ranks.

Every rank would hit the same mistake and report it, followed by torchrun's failure
summary; checking here gives one line instead. The ranks repeat the checks that guard
correctness (output path, columns), so a direct torchrun launch is protected too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from trainer.arrow_chunks import is_id_type, is_number_type
from trainer.data import DataError, required_columns
from valuerank.config import PipelineConfig
from valuerank.output_paths import check_output_path

MANIFEST_NAME = "_manifest.json"
TRAIN_JOB = "train"
_EARLIER_OUTPUTS = ("checkpoint", "tensorboard", "predictions", "plots", "metrics.json", "checkpoints", "steps")


def check_data(cfg: PipelineConfig, data: Path) -> None:
    """Raise DataError unless ``data`` has train/ and eval/ with every column the config reads."""
    for split in ("train", "eval"):
        folder = data / split
        if not folder.is_dir():
            raise DataError(f"--data {data}: missing {split}/ folder; pass the output folder of valuerank downsample")
        dataset = ds.dataset(str(folder), format="parquet")
        columns = dataset.schema.names
        missing = [column for column in required_columns(cfg) if column not in columns]
        if missing:
            raise DataError(
                f"{folder}: missing column {missing[0]!r} named in the config; columns present: {', '.join(columns)}"
            )
        for path in dataset.files:
            check_column_types(cfg, Path(path))


def check_column_types(cfg: PipelineConfig, path: Path) -> None:
    """Raise DataError naming the file and column when a column the trainer reads has the wrong type.

    Only the Parquet footer is read. Values are checked later by the ranks (for example ids
    outside the table when hashing is off).
    """
    schema = pq.read_schema(path)
    expected = [(f.column, is_id_type, "integer ids or a list of integer ids") for f in cfg.sparse_features]
    expected += [(f.column, is_number_type, "numbers") for f in cfg.dense_features]
    expected += [(column, is_number_type, "0/1 integers") for column in cfg.label_columns]
    expected += [(column, is_number_type, "numbers") for column in ("weight", "keep_rate")]
    for column, accepts, expected_type in expected:
        if column not in schema.names:
            continue
        arrow_type = schema.field(column).type
        if not accepts(arrow_type):
            raise DataError(
                f"{path}: column {column!r} has type {arrow_type}, but the trainer reads it as {expected_type}; "
                "fix the column in the data (the Spark jobs pass feature columns through unchanged)"
            )


def check_out_dir(out: Path, data: Path) -> Path:
    """Raise OutputPathError if ``out`` overlaps the data or contains files that no training run wrote."""
    return check_output_path(TRAIN_JOB, out, {"data": data}, MANIFEST_NAME)


def reset_out_dir(out: Path) -> None:
    """Remove an earlier run's outputs from ``out`` and mark it as a training output folder.

    Without this, a rerun would mix TensorBoard event files and checkpoint shards of two
    runs, for example a 3-rank checkpoint's third shard beside a 2-rank checkpoint.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in _EARLIER_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (out / MANIFEST_NAME).write_text(f'{{"job": "{TRAIN_JOB}"}}\n')
