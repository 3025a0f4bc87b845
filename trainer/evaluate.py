"""Evaluate on the full evaluation split: predict on all ranks, score on rank 0."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from trainer.data import SplitData
from trainer.metrics import action_metrics, correct_for_keep_rates, keep_rates_for_rows
from trainer.ranking import RankingDataError, value_ndcg
from trainer.reporting import plot_calibration
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: torch.nn.Module, data: SplitData, cfg: PipelineConfig, device: torch.device) -> np.ndarray | None:
    """Return sigmoid outputs [num_rows, num_actions] on rank 0 (None on other ranks).

    Every rank runs the same number of forward passes, because the sharded embedding
    lookup is a collective. Padding rows carry row index -1 and are dropped before the gather.
    """
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    model.eval()

    rows = []
    outputs = []
    for batch in data.eval_batches(rank, world_size, cfg.training.batch_size):
        batch = batch.to(device)
        _, output = model(batch)
        probabilities = torch.sigmoid(output.logits)
        keep = batch.row_index >= 0
        rows.append(batch.row_index[keep].cpu())
        outputs.append(probabilities[keep].float().cpu())
    model.train()

    local_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    local_outputs = torch.cat(outputs) if outputs else torch.zeros(0, len(cfg.actions))
    # NOTE: rank 0 receives every prediction in memory (8 bytes per action per row). That
    # suits evaluation splits up to tens of millions of rows; larger ones need per-rank files.
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (local_rows.numpy(), local_outputs.numpy()))
    if rank != 0:
        return None

    result = np.full((data.num_rows, len(cfg.actions)), np.nan, dtype=np.float64)
    seen = np.zeros(data.num_rows, dtype=np.int64)
    for row_index, values in gathered:
        result[row_index] = values
        np.add.at(seen, row_index, 1)
    if not (seen == 1).all():
        raise RuntimeError(
            f"evaluation covered {int((seen == 1).sum())} of {data.num_rows} rows exactly once; "
            "the rank split of the evaluation data is broken"
        )
    return result


def score_predictions(
    q: np.ndarray, data: SplitData, cfg: PipelineConfig, action_keep_rates: dict
) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """Correct raw predictions, compute metrics; return (metrics, corrected per action, value score)."""
    corrected = {}
    metrics = {}
    for i, action in enumerate(cfg.actions):
        if cfg.training.loss_weighting == "inverse_keep_rate":
            # The loss already weighted each row by 1 / keep_rate, so q estimates p.
            p = q[:, i]
        else:
            keep_positive, keep_negative = keep_rates_for_rows(action_keep_rates, action.name, data.stratum_value, data.num_rows)
            p = correct_for_keep_rates(q[:, i], keep_positive, keep_negative)
        corrected[action.name] = p

        eligible = data.label_mask[:, i] > 0
        metrics[action.name] = action_metrics(data.labels[eligible, i], p[eligible], q[eligible, i])

    value_score = np.zeros(data.num_rows)
    for action in cfg.actions:
        value_score += action.value_weight * corrected[action.name]
    return metrics, corrected, value_score


def write_predictions(path: Path, data: SplitData, cfg: PipelineConfig, q: np.ndarray, corrected: dict, value_score: np.ndarray) -> None:
    """Write impression_id, raw and corrected probabilities, labels and value score as Parquet."""
    columns = {"impression_id": pa.array(data.impression_id)}
    for i, action in enumerate(cfg.actions):
        columns[f"p_{action.name}"] = pa.array(corrected[action.name])
        columns[f"q_{action.name}"] = pa.array(q[:, i])
        columns[action.label_column] = pa.array(data.labels[:, i].astype(np.int8))
    columns["value_score"] = pa.array(value_score)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def evaluate(model, data: SplitData, cfg: PipelineConfig, device: torch.device, action_keep_rates: dict, out_dir: Path) -> dict | None:
    """Predict, correct, score, and on rank 0 write predictions and the calibration plot."""
    q = predict(model, data, cfg, device)
    if q is None:
        return None
    return report_predictions(q, data, cfg, action_keep_rates, out_dir)


def report_predictions(q: np.ndarray, data: SplitData, cfg: PipelineConfig, action_keep_rates: dict, out_dir: Path) -> dict:
    """Score raw predictions ``q`` [num_rows, num_actions]; write predictions and plots under ``out_dir``.

    The trainer and the baselines both call this, so their metrics share one definition.
    """
    metrics, corrected, value_score = score_predictions(q, data, cfg, action_keep_rates)
    try:
        ranking = value_ndcg(cfg, data.path, data.impression_id, data.labels, data.label_mask, value_score)
        logger.info(
            "eval value_score ndcg=%.4f (random order %.4f) over %d %s groups",
            ranking["ndcg"], ranking["random_order_ndcg"], ranking["groups_scored"], ranking["group_by"],
        )
    except RankingDataError as error:
        # The downsample job always writes the group columns; hand-built splits may lack them.
        logger.warning("value-score NDCG skipped: %s", error)
        ranking = {"skipped": str(error)}
    write_predictions(out_dir / "predictions" / "part-0.parquet", data, cfg, q, corrected, value_score)
    labels = {a.name: data.labels[:, i] for i, a in enumerate(cfg.actions)}
    plot_calibration(out_dir / "plots" / "calibration.png", labels, corrected)
    return {
        "actions": metrics,
        "value_score": {
            "weights": {a.name: a.value_weight for a in cfg.actions},
            "mean": float(value_score.mean()),
            "std": float(value_score.std()),
            "ranking": ranking,
        },
        "rows": data.num_rows,
    }
