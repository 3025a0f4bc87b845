"""Compare finished runs (trainer or baselines) on one evaluation split: one table, one plot per action.

    valuerank compare --run shared_bottom=runs/kuairand/model --run logistic=runs/kuairand/baselines/logistic \\
        --out runs/kuairand/comparison

Each run folder needs ``metrics.json`` and ``predictions/`` as written by ``valuerank train``
or ``valuerank baselines``. The runs must have predicted the same evaluation rows, or the
command fails. Outputs: ``comparison.md`` (the summary table and per-action details),
``comparison.json`` (the same numbers) and ``plots/reliability_<action>.png`` with every
run's reliability curve (corrected predictions) for that action.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402

from trainer.metrics import reliability_curve  # noqa: E402
from valuerank.output_paths import check_output_path  # noqa: E402

logger = logging.getLogger(__name__)

JOB = "compare"
MANIFEST_NAME = "_manifest.json"
DETAIL_METRICS = ("auc", "log_loss", "normalized_entropy", "calibration")


class ComparisonError(ValueError):
    """The runs cannot be compared: a missing file, or different evaluation rows."""


def load_run(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Return a run's metrics and its predictions table as columns sorted by impression id."""
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise ComparisonError(f"{metrics_path} not found; pass the --out folder of a finished train or baselines run")
    metrics = json.loads(metrics_path.read_text())
    predictions_path = path / "predictions"
    if not predictions_path.is_dir():
        raise ComparisonError(f"{predictions_path} not found; the run did not finish its evaluation")
    table = ds.dataset(str(predictions_path), format="parquet").to_table()
    order = np.argsort(table["impression_id"].to_numpy(), kind="stable")
    columns = {name: table[name].to_numpy()[order] for name in table.column_names}
    return metrics, columns


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _ranking(metrics: dict) -> dict:
    return metrics.get("value_score", {}).get("ranking") or {}


def build_comparison(runs: dict[str, Path]) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Load every run, check that they scored the same rows, and collect their metrics."""
    loaded = {name: load_run(path) for name, path in runs.items()}
    reference_name = next(iter(loaded))
    reference_ids = loaded[reference_name][1]["impression_id"]
    for name, (_, columns) in loaded.items():
        if not np.array_equal(columns["impression_id"], reference_ids):
            raise ComparisonError(
                f"run {name!r} ({runs[name]}) predicted {len(columns['impression_id'])} evaluation rows that differ from "
                f"the {len(reference_ids)} rows of run {reference_name!r}; compare runs on the same downsampled data"
            )

    first_metrics = loaded[reference_name][0]
    actions = list(first_metrics["actions"])
    cutoffs = sorted(
        {key for _, (m, _) in loaded.items() for key in _ranking(m) if key.startswith("ndcg@")},
        key=lambda key: int(key.split("@")[1]),
    )
    table = {
        "rows": int(len(reference_ids)),
        "actions": actions,
        "ndcg_keys": ["ndcg", *cutoffs],
        "runs": {},
    }
    for name, (metrics, _) in loaded.items():
        ranking = _ranking(metrics)
        table["runs"][name] = {
            "path": str(runs[name]),
            "actions": {
                action: {key: _number(metrics["actions"][action].get(key)) for key in DETAIL_METRICS}
                for action in actions
            },
            "ndcg": {key: _number(ranking.get(key)) for key in table["ndcg_keys"]},
            "training_seconds": _number(metrics.get("training", {}).get("seconds")),
        }
    # The random-order NDCG depends only on the rows and labels, so one run gives it for all.
    first_ranking = _ranking(first_metrics)
    table["random_order_ndcg"] = {key: _number(first_ranking.get(f"random_order_{key}")) for key in table["ndcg_keys"]}
    table["ndcg_groups"] = {key: first_ranking.get(key) for key in ("group_by", "groups", "groups_scored", "groups_constant_gain")}
    return table, {name: columns for name, (_, columns) in loaded.items()}


def _cell(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def render_markdown(table: dict) -> str:
    """Render the comparison as Markdown: a summary table, then one detail table per action."""
    actions = table["actions"]
    ndcg_keys = table["ndcg_keys"]
    header = ["model", *(f"AUC {a}" for a in actions), *(f"value {k.replace('ndcg', 'NDCG')}" for k in ndcg_keys)]
    lines = [
        f"Evaluation rows: {table['rows']}. Value NDCG groups: {table['ndcg_groups'].get('groups_scored')} "
        f"{table['ndcg_groups'].get('group_by')} groups scored of {table['ndcg_groups'].get('groups')} "
        f"({table['ndcg_groups'].get('groups_constant_gain')} have one gain for every row and are left out).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, run in table["runs"].items():
        cells = [name, *(_cell(run["actions"][a]["auc"]) for a in actions), *(_cell(run["ndcg"][k]) for k in ndcg_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    random_cells = ["random order", *("0.5" for _ in actions), *(_cell(table["random_order_ndcg"][k]) for k in ndcg_keys)]
    lines.append("| " + " | ".join(random_cells) + " |")

    lines += ["", "| action | model | AUC | log loss | normalized entropy | calibration |", "|---|---|---|---|---|---|"]
    for action in actions:
        for name, run in table["runs"].items():
            values = run["actions"][action]
            lines.append(
                f"| {action} | {name} | {_cell(values['auc'])} | {_cell(values['log_loss'])} | "
                f"{_cell(values['normalized_entropy'])} | {_cell(values['calibration'], 3)} |"
            )
    return "\n".join(lines) + "\n"


def plot_reliability(path: Path, action: str, predictions: dict[str, dict[str, np.ndarray]]) -> None:
    """Write one action's reliability diagram with one curve per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 1e-3
    for name, columns in predictions.items():
        p = columns[f"p_{action}"].astype(np.float64)
        labels = columns[f"label_{action}"].astype(np.float64)
        mean_p, rate, _ = reliability_curve(labels, p)
        top = max(top, float(mean_p.max(initial=0)), float(rate.max(initial=0)))
        ax.plot(mean_p, rate, marker="o", label=name)
    top *= 1.05
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted probability (decile of predictions)")
    ax.set_ylabel("observed rate")
    ax.set_title(f"{action}: reliability on the evaluation split")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_comparison(runs: dict[str, Path], out_dir: Path) -> dict:
    """Write comparison.md, comparison.json and the per-action reliability PNGs; return the table."""
    check_output_path(JOB, out_dir, {f"run {name}": path for name, path in runs.items()}, MANIFEST_NAME)
    table, predictions = build_comparison(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).write_text(json.dumps({"job": JOB}) + "\n")
    (out_dir / "comparison.json").write_text(json.dumps(_json_safe(table), indent=2, allow_nan=False))
    (out_dir / "comparison.md").write_text(render_markdown(table))
    for action in table["actions"]:
        plot_reliability(out_dir / "plots" / f"reliability_{action}.png", action, predictions)
    logger.info("wrote %s", out_dir / "comparison.md")
    return table


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def parse_runs(specs: list[str]) -> dict[str, Path]:
    """Parse ``NAME=DIR`` arguments into an ordered mapping; names must be unique."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name or not path:
            raise ComparisonError(f"--run {spec!r}: write it as NAME=DIR, for example mmoe=runs/kuairand/mmoe")
        if name in runs:
            raise ComparisonError(f"--run {spec!r}: the name {name!r} is used twice")
        runs[name] = Path(path)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valuerank compare", description="Compare finished runs on one evaluation split.")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run to compare, as name=folder; repeat, in table order")
    parser.add_argument("--out", required=True, type=Path, help="folder for comparison.md, comparison.json and plots/")
    args = parser.parse_args(argv)
    run_comparison(parse_runs(args.run), args.out)
    print((args.out / "comparison.md").read_text())
    return 0
