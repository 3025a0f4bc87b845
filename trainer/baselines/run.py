"""Train the baselines on the output of the downsample job and score them like the trainer.

    valuerank baselines --config configs/kuairand.toml --data runs/kuairand/downsampled \\
        --out runs/kuairand/baselines

For each model, ``<out>/<model>/`` gets the trainer's layout: ``metrics.json`` (same keys as
the trainer's, plus ``model`` and ``settings``), ``predictions/part-0.parquet`` and
``plots/calibration.png``. xgboost adds ``plots/boosting_curves.png`` with the training and
holdout log loss per round. ``valuerank compare`` reads these folders beside a trainer run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from math import isfinite
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.baselines.features import collect_split  # noqa: E402
from trainer.baselines.models import LogisticSettings, XGBoostSettings, fit_logistic, fit_xgboost  # noqa: E402
from trainer.data import SplitData  # noqa: E402
from trainer.evaluate import report_predictions  # noqa: E402
from trainer.metrics import load_action_keep_rates  # noqa: E402
from trainer.reporting import make_writer  # noqa: E402
from valuerank.config import PipelineConfig, load_config  # noqa: E402
from valuerank.output_paths import check_output_path  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = ("logistic", "xgboost")
JOB = "baselines"
MANIFEST_NAME = "_manifest.json"


def prepare_out_dir(out_dir: Path, data_dir: Path) -> None:
    """Check the output folder, remove an earlier baselines run from it, and mark it as ours."""
    check_output_path(JOB, out_dir, {"data": data_dir}, MANIFEST_NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        if (out_dir / model).is_dir():
            shutil.rmtree(out_dir / model)
    (out_dir / MANIFEST_NAME).write_text(json.dumps({"job": JOB}) + "\n")


def run_baselines(
    cfg: PipelineConfig,
    data_dir: Path,
    out_dir: Path,
    models: list[str] | tuple[str, ...] = MODELS,
    logistic: LogisticSettings | None = None,
    xgboost: XGBoostSettings | None = None,
) -> dict[str, dict]:
    """Fit and score each model in ``models``; return its metrics by model name."""
    from trainer.train import json_safe

    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; valid baselines: {', '.join(MODELS)}")
    logistic = logistic or LogisticSettings()
    xgboost = xgboost or XGBoostSettings()
    prepare_out_dir(out_dir, data_dir)

    # The same splits, dense statistics and keep rates as the trainer.
    train_data = SplitData(data_dir / "train", cfg)
    eval_data = SplitData(data_dir / "eval", cfg, dense_stats=train_data.dense_stats)
    keep_rates = load_action_keep_rates(data_dir / "_manifest.json")
    train = collect_split(train_data, cfg)
    evaluation = collect_split(eval_data, cfg)
    logger.info("data: %d training rows, %d evaluation rows from %s", train.num_rows, evaluation.num_rows, data_dir)

    results = {}
    for name in models:
        start = time.perf_counter()
        feature_names = None
        if name == "logistic":
            fit, settings = fit_logistic(cfg, train, evaluation, logistic), logistic
        else:
            (fit, feature_names), settings = fit_xgboost(cfg, train, evaluation, xgboost, cfg.training.seed), xgboost
        seconds = time.perf_counter() - start

        model_dir = out_dir / name
        metrics = report_predictions(fit.q, eval_data, cfg, keep_rates, model_dir)
        if fit.curves:
            plot_boosting_curves(model_dir / "plots" / "boosting_curves.png", fit.curves)
        metrics.update(
            model=name,
            settings=dataclasses.asdict(settings),
            training={"seconds": seconds, "rows": train.num_rows, "per_action": fit.details},
        )
        if feature_names is not None:
            metrics["features"] = feature_names
        (model_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
        write_eval_scalars(model_dir / "tensorboard", metrics)
        for action, values in metrics["actions"].items():
            logger.info("%s eval action=%s auc=%.4f ne=%.4f calibration=%.3f", name, action, values["auc"], values["normalized_entropy"], values["calibration"])
        logger.info("wrote %s (%.1f s)", model_dir / "metrics.json", seconds)
        results[name] = metrics
    return results


def plot_boosting_curves(path: Path, curves: dict[str, dict[str, list[float]]]) -> None:
    """Write the training and holdout log loss per boosting round, one panel per action, as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(curves)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, losses in curves[name].items():
            ax.plot(np.arange(1, len(losses) + 1), losses, label=split)
        ax.set_title(name)
        ax.set_xlabel("boosting round")
        ax.set_ylabel("log loss")
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("xgboost: training and early-stopping holdout log loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_eval_scalars(log_dir: Path, metrics: dict) -> None:
    """Write the evaluation metrics as TensorBoard scalars under the trainer's tags, at step 0.

    A baseline has no training steps that match the network's, so its one point sits at step 0;
    TensorBoard then shows each baseline as a run beside the network's ``tensorboard`` folder.
    """
    writer = make_writer(0, log_dir)
    for action, values in metrics["actions"].items():
        for key in ("auc", "log_loss", "normalized_entropy", "calibration"):
            value = values.get(key)
            if value is not None and isfinite(value):
                writer.add_scalar(f"eval/{key}/{action}", value, 0)
    for key, value in metrics["value_score"].get("ranking", {}).items():
        if key.startswith("ndcg") and isinstance(value, float) and isfinite(value):
            writer.add_scalar(f"eval/value_{key}", value, 0)
    writer.close()


def build_parser(prog: str = "valuerank baselines") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train logistic regression and xgboost baselines per action and score them like the trainer.")
    parser.add_argument("--config", required=True, help="pipeline config (TOML)")
    parser.add_argument("--data", required=True, type=Path, help="output folder of the downsample job (train/, eval/)")
    parser.add_argument("--out", required=True, type=Path, help="folder that gets one subfolder per baseline")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated baselines to run (default {','.join(MODELS)})")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value; repeatable")
    parser.add_argument("--logistic-c", type=float, default=LogisticSettings.c, help="inverse L2 strength C of the logistic regression (default %(default)s)")
    parser.add_argument("--xgb-learning-rate", type=float, default=XGBoostSettings.learning_rate, help="xgboost learning rate (default %(default)s)")
    parser.add_argument("--xgb-max-depth", type=int, default=XGBoostSettings.max_depth, help="xgboost maximum tree depth (default %(default)s)")
    parser.add_argument("--xgb-max-rounds", type=int, default=XGBoostSettings.max_rounds, help="xgboost maximum boosting rounds (default %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="xgboost threads (default: the cores available to this process)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.override)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = run_baselines(
        cfg, args.data, args.out, models,
        LogisticSettings(c=args.logistic_c),
        XGBoostSettings(learning_rate=args.xgb_learning_rate, max_depth=args.xgb_max_depth, max_rounds=args.xgb_max_rounds, threads=args.threads),
    )
    for name in results:
        print(f"{name}: {args.out / name / 'metrics.json'}")
    return 0
