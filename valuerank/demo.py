"""The default demo: synthetic log with known truth -> label join -> downsampling -> training.

Because the generator stores each impression's true action probabilities, the demo can
measure how close the keep-rate-corrected predictions are to the truth, which no real log allows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from valuerank import synthetic
from valuerank.config import PipelineConfig, load_config
from valuerank.pipeline import PipelinePaths, run_spark_stages, run_training

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
# About 150 impressions per user and 300 per item over two weeks, so that the embeddings
# can learn user and item effects in a few epochs on two CPU ranks.
DEMO_USERS = 2_000
DEMO_ITEMS = 1_000


def compare_with_truth(cfg: PipelineConfig, paths: PipelinePaths) -> dict:
    """Compare mean corrected and uncorrected predictions with the true rates on the eval split."""
    predictions = ds.dataset(str(paths.model / "predictions"), format="parquet").to_table().to_pandas()
    truth_columns = ["impression_id"] + [f"true_p_{a.name}" for a in cfg.actions]
    truth = ds.dataset(str(paths.downsampled / "eval"), format="parquet").to_table(columns=truth_columns).to_pandas()
    joined = predictions.merge(truth, on="impression_id", how="inner", validate="one_to_one")
    if len(joined) != len(predictions):
        raise RuntimeError(f"{len(predictions) - len(joined)} predictions have no truth row in {paths.downsampled / 'eval'}")

    report = {}
    for action in cfg.actions:
        true_rate = float(joined[f"true_p_{action.name}"].mean())
        corrected = float(joined[f"p_{action.name}"].mean())
        uncorrected = float(joined[f"q_{action.name}"].mean())
        report[action.name] = {
            "true_rate": true_rate,
            "observed_rate": float(joined[action.label_column].mean()),
            "mean_corrected": corrected,
            "mean_uncorrected": uncorrected,
            "corrected_relative_error": corrected / true_rate - 1 if true_rate > 0 else None,
            "uncorrected_relative_error": uncorrected / true_rate - 1 if true_rate > 0 else None,
            "correlation_with_truth": float(np.corrcoef(joined[f"p_{action.name}"], joined[f"true_p_{action.name}"])[0, 1]),
        }
    return report


def _format_metric(value: float | None) -> str:
    """Format a metric; None is an undefined metric, e.g. AUC of an action without positives."""
    return "n/a" if value is None else f"{value:.3f}"


def format_truth_report(report: dict) -> str:
    lines = [f"{'action':<14}{'true rate':>11}{'corrected':>11}{'error':>9}{'uncorrected':>13}{'error':>9}{'corr(p,true)':>14}"]
    for name, row in report.items():
        lines.append(
            f"{name:<14}{row['true_rate']:>11.5f}{row['mean_corrected']:>11.5f}{row['corrected_relative_error']:>+9.1%}"
            f"{row['mean_uncorrected']:>13.5f}{row['uncorrected_relative_error']:>+9.1%}{row['correlation_with_truth']:>14.3f}"
        )
    return "\n".join(lines)


def run_demo(out: Path, impressions: int, seed: int, nproc_per_node: int, config_path: Path = DEMO_CONFIG, overrides: list[str] = ()) -> dict:
    """Generate the synthetic log, run all stages and write ``<out>/truth_report.json``."""
    cfg = load_config(config_path, overrides)
    paths = PipelinePaths(out)
    raw = out / "raw"

    logger.info("generating %d synthetic impressions in %s", impressions, raw)
    synthetic.generate(raw, num_impressions=impressions, seed=seed, num_users=DEMO_USERS, num_items=DEMO_ITEMS)

    join_manifest, down_manifest = run_spark_stages(cfg, raw / "impressions", raw / "events", paths)
    logger.info(
        "label join: %d impressions in, %d labelled; downsample: %d training rows kept of %d, %d evaluation rows",
        join_manifest["impressions"]["rows_in"], join_manifest["impressions"]["rows_out"],
        down_manifest["train"]["rows_out"], down_manifest["train"]["rows_in"], down_manifest["eval"]["rows_out"],
    )

    run_training(config_path, paths, nproc_per_node, list(overrides))

    report = compare_with_truth(cfg, paths)
    (out / "truth_report.json").write_text(json.dumps(report, indent=2))
    metrics = json.loads((paths.model / "metrics.json").read_text())
    print("\nEvaluation split: mean predicted probability against the generator's true probability")
    print(format_truth_report(report))
    print("\nPer-action metrics (corrected predictions)")
    for name, values in metrics["actions"].items():
        shown = {key: _format_metric(values[key]) for key in ("auc", "normalized_entropy", "calibration")}
        print(f"  {name:<12} auc={shown['auc']} ne={shown['normalized_entropy']} calibration={shown['calibration']}")
    print(f"\nOutputs: {paths.model} (metrics.json, predictions/, plots/, checkpoints/), {out / 'truth_report.json'}")
    return report
