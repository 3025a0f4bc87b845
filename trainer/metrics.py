"""Keep-rate correction and per-action evaluation metrics (NumPy, on rank 0)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

logger = logging.getLogger(__name__)

_EPS = 1e-7
ALL_STRATA = "__all__"


def correct_for_keep_rates(q: np.ndarray, keep_positive: np.ndarray, keep_negative: np.ndarray) -> np.ndarray:
    """Map predictions learned on downsampled data back to true probabilities.

    If positives were kept at rate ``keep_positive`` and negatives at ``keep_negative``,
    the odds seen in training are the true odds times keep_positive / keep_negative, so
    odds(p) = odds(q) * keep_negative / keep_positive. With every positive kept this is
    p = q / (q + (1 - q) / keep_negative).
    """
    q = np.clip(q, _EPS, 1 - _EPS)
    numerator = q * keep_negative
    return numerator / (numerator + (1 - q) * keep_positive)


def load_action_keep_rates(manifest_path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Read ``action_keep_rates`` from the downsample manifest; empty if there is none."""
    if not manifest_path.exists():
        return {}
    return json.loads(manifest_path.read_text()).get("action_keep_rates", {})


def keep_rates_for_rows(
    rates: dict[str, dict[str, dict[str, float | None]]], action: str, stratum_value: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return per-row (keep_positive, keep_negative) arrays for one action.

    A rate of None (no training row of that class in the group) counts as 1. Rows whose
    stratum value never occurred in training also get 1, so they stay uncorrected; the
    count is logged.
    """
    by_value = rates.get(action, {})
    keep_positive = np.ones(n)
    keep_negative = np.ones(n)
    if not by_value:
        return keep_positive, keep_negative

    if stratum_value is None or ALL_STRATA in by_value:
        entry = by_value.get(ALL_STRATA) or next(iter(by_value.values()))
        keep_positive[:] = entry["positive"] or 1.0
        keep_negative[:] = entry["negative"] or 1.0
        return keep_positive, keep_negative

    matched = np.zeros(n, dtype=bool)
    for value, entry in by_value.items():
        rows = stratum_value == value
        matched |= rows
        keep_positive[rows] = entry["positive"] or 1.0
        keep_negative[rows] = entry["negative"] or 1.0
    if not matched.all():
        unseen = sorted(set(stratum_value[~matched].tolist()))
        logger.warning(
            "%d evaluation rows have stratum values without training keep rates for %r (%s); "
            "their predictions are left uncorrected",
            int((~matched).sum()), action, ", ".join(map(str, unseen[:10])),
        )
    return keep_positive, keep_negative


def log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def action_metrics(labels: np.ndarray, p: np.ndarray, q: np.ndarray) -> dict:
    """AUC, log loss, normalized entropy and calibration of corrected predictions ``p``.

    Normalized entropy is the log loss divided by the log loss of always predicting the
    observed rate; below 1 means better than the base rate. Calibration is the mean
    prediction over the observed rate (1 is calibrated). ``q`` are the uncorrected
    predictions, reported for comparison.
    """
    rate = float(labels.mean()) if len(labels) else float("nan")
    positives = int(labels.sum())
    result = {
        "rows": int(len(labels)),
        "positives": positives,
        "observed_rate": rate,
        "mean_prediction": float(p.mean()),
        "mean_prediction_uncorrected": float(q.mean()),
        "calibration": float(p.mean() / rate) if rate > 0 else float("nan"),
        "calibration_uncorrected": float(q.mean() / rate) if rate > 0 else float("nan"),
        "log_loss": log_loss(labels, p),
    }
    if 0 < positives < len(labels):
        base = log_loss(labels, np.full_like(p, rate))
        result["auc"] = float(roc_auc_score(labels, p))
        result["normalized_entropy"] = result["log_loss"] / base
    else:
        # AUC and NE are undefined with a single class in the evaluation split.
        result["auc"] = float("nan")
        result["normalized_entropy"] = float("nan")
    return result


def reliability_curve(labels: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin predictions by quantile; return (mean prediction, observed rate, count) per bin."""
    if len(p) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    counts = np.bincount(which, minlength=len(edges) - 1).astype(float)
    nonempty = counts > 0
    mean_p = np.bincount(which, weights=p, minlength=len(edges) - 1)[nonempty] / counts[nonempty]
    rate = np.bincount(which, weights=labels, minlength=len(edges) - 1)[nonempty] / counts[nonempty]
    return mean_p, rate, counts[nonempty]
