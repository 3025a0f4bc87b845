"""Search learning rates, embedding dimension and tower sizes; write one results row per configuration.

    valuerank sweep --config configs/kuairand.toml --data runs/kuairand/downsampled \\
        --out runs/kuairand/sweep --validation-days 2

Every configuration trains with ``valuerank train`` (torchrun) in ``<out>/trials/<id>/``.
By default it is scored on a validation split cut from the last ``--validation-days`` of the
training split, written to ``<out>/data/``, so the evaluation split stays untouched for the
final comparison. The validation rows come from the downsampled training split, so their
metrics describe the downsampled mix of rows. They rank configurations, but their
calibration is not that of the full log. ``--on-eval`` scores on the evaluation split instead.

The search space is a grid, one ``--param KEY=[V1, V2, ...]`` per dimension, where KEY is a
config key such as ``training.dense_lr`` or ``model.tower_layers``, or ``embedding_dim``,
which sets every sparse feature's dimension. ``--mode random --trials N`` draws N distinct
points of the grid instead of all. Outputs: ``results.md``, ``results.csv`` and
``results.json``, rewritten after each trial and sorted by ``--objective``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from launch.local import positive_int, threads_per_rank, torchrun_command
from valuerank.config import ConfigError, PipelineConfig, load_config
from valuerank.output_paths import check_output_path

logger = logging.getLogger(__name__)

JOB = "sweep"
MANIFEST_NAME = "_manifest.json"
DEFAULT_SPACE = {
    "training.dense_lr": [0.001, 0.003],
    "embedding_dim": [8, 16],
    "model.tower_layers": [[16], [32, 16]],
}
_TICKS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class SweepError(ValueError):
    """Invalid sweep arguments or data; the message names the argument and the fix."""


def parse_param(text: str) -> tuple[str, list]:
    """Parse ``KEY=[V1, V2]`` (a TOML array) into the key and its values."""
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise SweepError(f"--param {text!r}: write it as KEY=[V1, V2], e.g. training.dense_lr=[0.001, 0.003]")
    try:
        values = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as error:
        raise SweepError(f"--param {text!r}: the values must be a TOML array such as [0.001, 0.003]: {error}") from error
    if not isinstance(values, list) or not values:
        raise SweepError(f"--param {text!r}: the values must be a non-empty TOML array such as [8, 16]")
    return key, values


def grid_points(space: dict[str, list], mode: str, trials: int | None, seed: int) -> list[dict]:
    """Return the configurations to run: the whole grid, or ``trials`` distinct random points of it."""
    keys = list(space)
    points = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    if mode == "grid":
        return points
    if trials is None or trials < 1:
        raise SweepError("--mode random needs --trials N with N >= 1")
    if trials >= len(points):
        logger.info("--trials %d covers the whole grid of %d points; running all of them", trials, len(points))
        return points
    chosen = np.random.default_rng(seed).choice(len(points), size=trials, replace=False)
    return [points[i] for i in sorted(chosen)]


def overrides_for(point: dict, cfg: PipelineConfig) -> list[str]:
    """Turn one configuration into ``section.key=value`` overrides; ``embedding_dim`` sets every sparse feature."""
    overrides = []
    for key, value in point.items():
        text = json.dumps(value)
        if key == "embedding_dim":
            overrides += [f"sparse_features.{i}.embedding_dim={text}" for i in range(len(cfg.sparse_features))]
        else:
            overrides.append(f"{key}={text}")
    return overrides


def carve_validation(data_dir: Path, out_dir: Path, days: float) -> dict:
    """Write the training split less its last ``days`` to ``out_dir/train`` and those days to ``out_dir/eval``."""
    if days <= 0:
        raise SweepError(f"--validation-days must be positive, got {days}")
    source = data_dir / "train"
    if not source.is_dir():
        raise SweepError(f"--data {data_dir}: missing train/ folder; pass the output folder of valuerank downsample")
    table = ds.dataset(str(source), format="parquet").to_table()
    if "timestamp" not in table.column_names or not pa.types.is_timestamp(table["timestamp"].type):
        raise SweepError(f"{source}: needs a timestamp column to cut a validation split by time")

    unit = table["timestamp"].type.unit
    ticks = pc.cast(table["timestamp"], pa.int64()).to_numpy()
    cutoff = int(ticks.max() - days * 86_400 * _TICKS_PER_SECOND[unit])
    is_validation = ticks >= cutoff
    counts = {"train": int((~is_validation).sum()), "eval": int(is_validation.sum())}
    if min(counts.values()) == 0:
        raise SweepError(
            f"{source}: the last {days} days hold {counts['eval']} of {table.num_rows} training rows; choose "
            "--validation-days so that both parts have rows"
        )

    for split, mask in (("train", ~is_validation), ("eval", is_validation)):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(mask)), out_dir / split / "part-0.parquet")
    # The keep rates of the downsample job still describe these rows.
    shutil.copyfile(data_dir / "_manifest.json", out_dir / "_manifest.json")
    start = pc.cast(pa.scalar(cutoff, pa.int64()), table["timestamp"].type).as_py()
    return {"validation_start": str(start), "rows": counts}


def _trial_row(trial: str, point: dict, status: str, seconds: float, metrics: dict | None, cfg: PipelineConfig) -> dict:
    row = {"trial": trial, **{key: json.dumps(value) for key, value in point.items()}, "status": status, "seconds": int(round(seconds))}
    actions = (metrics or {}).get("actions", {})
    ranking = (metrics or {}).get("value_score", {}).get("ranking") or {}
    aucs = []
    for action in cfg.actions:
        auc = actions.get(action.name, {}).get("auc")
        row[f"auc_{action.name}"] = auc
        if auc is not None:
            aucs.append(auc)
    row["auc_mean"] = float(np.mean(aucs)) if aucs else None
    for key in ("ndcg", *(f"ndcg@{k}" for k in cfg.evaluation.ndcg_cutoffs)):
        row[key] = ranking.get(key)
    row["final_loss"] = (metrics or {}).get("training", {}).get("final_loss")
    return row


def objective_columns(cfg) -> list[str]:
    """Result columns that ``--objective`` may name; every one but final_loss is better when higher."""
    return [
        "ndcg", *(f"ndcg@{k}" for k in cfg.evaluation.ndcg_cutoffs), "auc_mean",
        *(f"auc_{a.name}" for a in cfg.actions), "final_loss",
    ]


def _sort_key(row: dict, objective: str) -> tuple:
    value = row.get(objective)
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    direction = 1.0 if objective == "final_loss" else -1.0
    return (0 if finite else 1, direction * value if finite else 0.0)


def write_results(out_dir: Path, rows: list[dict], objective: str, header: dict) -> None:
    """Write results.json, results.csv and results.md, best ``objective`` first."""
    ordered = sorted(rows, key=lambda row: _sort_key(row, objective))
    (out_dir / "results.json").write_text(json.dumps({**header, "objective": objective, "trials": ordered}, indent=2))
    columns = list(ordered[0]) if ordered else []
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(ordered)

    def cell(value) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    lines = [
        f"Scored on: {header['scored_on']}. Sorted by {objective}, best first"
        f" ({'lowest' if objective == 'final_loss' else 'highest'} first).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in ordered]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def run_sweep(
    config_path: Path,
    data_dir: Path,
    out_dir: Path,
    space: dict[str, list],
    *,
    mode: str = "grid",
    trials: int | None = None,
    seed: int = 0,
    validation_days: float | None = 1.0,
    nproc_per_node: int = 1,
    base_overrides: list[str] | tuple[str, ...] = (),
    objective: str = "ndcg",
) -> list[dict]:
    """Train and score every configuration; return the result rows in run order."""
    cfg = load_config(config_path, base_overrides)
    objectives = objective_columns(cfg)
    if objective not in objectives:
        raise SweepError(f"--objective {objective!r} is not a result column; valid: {', '.join(objectives)}")
    points = grid_points(space, mode, trials, seed)
    # Build every trial's config first, so that a bad key fails before any training.
    for point in points:
        load_config(config_path, [*base_overrides, *overrides_for(point, cfg)])

    check_output_path(JOB, out_dir, {"data": data_dir}, MANIFEST_NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("trials", "data"):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
    (out_dir / MANIFEST_NAME).write_text(json.dumps({"job": JOB}) + "\n")

    if validation_days is None:
        scored_data = data_dir
        header = {"scored_on": f"the evaluation split of {data_dir} (results tuned on it are optimistic)"}
        logger.warning("scoring the sweep on the evaluation split; metrics of the chosen configuration will be optimistic")
    else:
        scored_data = out_dir / "data"
        carved = carve_validation(data_dir, scored_data, validation_days)
        header = {
            "scored_on": f"validation rows from {carved['validation_start']} on, the last {validation_days} days of the "
            f"training split of {data_dir} ({carved['rows']['train']} training, {carved['rows']['eval']} validation rows)",
            **carved,
        }
    header["space"] = space

    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank(nproc_per_node)))
    rows = []
    for index, point in enumerate(points):
        trial = f"{index:03d}"
        trial_dir = out_dir / "trials" / trial
        args = ["--config", str(config_path), "--data", str(scored_data), "--out", str(trial_dir)]
        for override in (*base_overrides, *overrides_for(point, cfg)):
            args += ["--override", override]
        logger.info("trial %s of %d: %s", trial, len(points), json.dumps(point))

        start = time.perf_counter()
        trial_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "trials" / f"{trial}.log", "w") as log:
            code = subprocess.call(torchrun_command(nproc_per_node, args), env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start

        metrics_path = trial_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if code == 0 and metrics_path.exists() else None
        status = "ok" if metrics is not None else f"failed (exit code {code}, see trials/{trial}.log)"
        row = _trial_row(trial, point, status, seconds, metrics, cfg)
        rows.append(row)
        logger.info("trial %s %s: %s=%s in %.0f s", trial, status, objective, row.get(objective), seconds)
        write_results(out_dir, rows, objective, header)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valuerank sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="pipeline config (TOML)")
    parser.add_argument("--data", required=True, type=Path, help="output folder of the downsample job (train/, eval/)")
    parser.add_argument("--out", required=True, type=Path, help="folder for trials/, data/ and the results tables")
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=[V1, V2]",
        help="one search dimension as a TOML array; repeatable. Default: " + "; ".join(f"{k}={json.dumps(v)}" for k, v in DEFAULT_SPACE.items()),
    )
    parser.add_argument("--mode", choices=("grid", "random"), default="grid", help="run the whole grid, or --trials random points of it")
    parser.add_argument("--trials", type=int, default=None, help="points drawn in random mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    scored = parser.add_mutually_exclusive_group()
    scored.add_argument("--validation-days", type=float, default=1.0, help="days at the end of the training split used for scoring (default 1)")
    scored.add_argument("--on-eval", action="store_true", help="score on the evaluation split instead (optimistic if used to choose)")
    parser.add_argument("--nproc-per-node", type=positive_int, default=1, help="training ranks per trial (default 1)")
    parser.add_argument("--objective", default="ndcg", help="result column to sort by: ndcg, ndcg@K, auc_mean, auc_<action> or final_loss (lowest first) (default ndcg)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override applied to every trial; repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    space = dict(parse_param(text) for text in args.param) if args.param else dict(DEFAULT_SPACE)
    try:
        rows = run_sweep(
            args.config, args.data, args.out, space,
            mode=args.mode, trials=args.trials, seed=args.seed,
            validation_days=None if args.on_eval else args.validation_days,
            nproc_per_node=args.nproc_per_node, base_overrides=args.override, objective=args.objective,
        )
    except ConfigError as error:
        raise SweepError(f"a sweep configuration is invalid: {error}") from error
    print((args.out / "results.md").read_text())
    return 0 if all(row["status"] == "ok" for row in rows) else 1
