"""The two baseline learners, one binary model per action: logistic regression and xgboost."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression

from trainer.baselines.features import SplitArrays, TargetEncoder, wide_matrix
from valuerank.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass
class LogisticSettings:
    c: float = 1.0
    """Inverse L2 strength of scikit-learn's LogisticRegression (its ``C``)."""

    max_iter: int = 1000
    """Iterations of the liblinear solver."""


@dataclass
class XGBoostSettings:
    max_rounds: int = 500
    """Upper bound on boosting rounds; early stopping usually ends sooner."""

    early_stopping_rounds: int = 30
    """Stop when the holdout log loss has not improved for this many rounds."""

    learning_rate: float = 0.05
    """Shrinkage (xgboost ``eta``)."""

    max_depth: int = 6
    """Maximum tree depth."""

    holdout_fraction: float = 0.1
    """Share of training rows, drawn at random, held out for early stopping (never evaluation rows)."""

    threads: int = 2
    """xgboost threads."""


@dataclass
class FitResult:
    """Raw predictions [num_eval_rows, num_actions] and per-action details for the report."""

    q: np.ndarray
    details: dict = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _row_weights(cfg: PipelineConfig, train: SplitArrays) -> np.ndarray:
    """Per-row training weights: 1 / keep_rate under ``inverse_keep_rate`` loss weighting, else 1."""
    if cfg.training.loss_weighting == "inverse_keep_rate":
        return train.weights
    return np.ones(train.num_rows)


def _single_class(labels: np.ndarray) -> float | None:
    """Return the constant label if ``labels`` has one class only, else None."""
    if len(labels) == 0:
        return 0.0
    if labels.min() == labels.max():
        return float(labels[0])
    return None


def fit_logistic(cfg: PipelineConfig, train: SplitArrays, evaluation: SplitArrays, settings: LogisticSettings) -> FitResult:
    """Fit one logistic regression per action on the wide matrix; predict the evaluation rows."""
    x_train = wide_matrix(train, cfg)
    x_eval = wide_matrix(evaluation, cfg)
    weights = _row_weights(cfg, train)
    q = np.zeros((evaluation.num_rows, len(cfg.actions)))
    details = {}
    for i, action in enumerate(cfg.actions):
        rows = train.label_mask[:, i] > 0
        labels = train.labels[rows, i]
        constant = _single_class(labels)
        if constant is not None:
            logger.warning("action %r has one class in the training split; logistic regression predicts %.0f", action.name, constant)
            q[:, i] = constant
            details[action.name] = {"constant": constant}
            continue

        # liblinear fitted the KuaiRand click model (36k rows, 70k hashed columns) about 10x
        # faster than lbfgs, to the same AUC. Unlike lbfgs it also penalises the intercept.
        model = LogisticRegression(C=settings.c, solver="liblinear", max_iter=settings.max_iter)
        model.fit(x_train[rows], labels, sample_weight=weights[rows])
        q[:, i] = model.predict_proba(x_eval)[:, 1]
        details[action.name] = {"iterations": int(np.max(model.n_iter_)), "nonzero_weights": int((model.coef_ != 0).sum())}
        logger.info("logistic action=%s iterations=%d", action.name, details[action.name]["iterations"])
    return FitResult(q=q, details=details)


def fit_xgboost(
    cfg: PipelineConfig, train: SplitArrays, evaluation: SplitArrays, settings: XGBoostSettings, seed: int
) -> tuple[FitResult, list[str]]:
    """Fit one xgboost classifier per action on encoded features; predict the evaluation rows.

    Returns the predictions and the encoded feature names.
    """
    from xgboost import XGBClassifier

    encoder = TargetEncoder(cfg, seed=seed)
    x_train = encoder.fit_transform(train)
    x_eval = encoder.transform(evaluation)
    weights = _row_weights(cfg, train)
    holdout = np.random.default_rng([seed, 1]).random(train.num_rows) < settings.holdout_fraction

    q = np.zeros((evaluation.num_rows, len(cfg.actions)))
    details = {}
    curves = {}
    for i, action in enumerate(cfg.actions):
        eligible = train.label_mask[:, i] > 0
        fit_rows = eligible & ~holdout
        stop_rows = eligible & holdout
        constant = _single_class(train.labels[eligible, i])
        if constant is not None or _single_class(train.labels[stop_rows, i]) is not None:
            value = constant if constant is not None else float(train.labels[eligible, i].mean())
            logger.warning(
                "action %r has one class in the training split or its early-stopping holdout; xgboost predicts %.4f",
                action.name, value,
            )
            q[:, i] = value
            details[action.name] = {"constant": value}
            continue

        model = XGBClassifier(
            n_estimators=settings.max_rounds,
            learning_rate=settings.learning_rate,
            max_depth=settings.max_depth,
            tree_method="hist",
            objective="binary:logistic",
            eval_metric="logloss",
            early_stopping_rounds=settings.early_stopping_rounds,
            n_jobs=settings.threads,
            random_state=seed,
        )
        model.fit(
            x_train[fit_rows], train.labels[fit_rows, i], sample_weight=weights[fit_rows],
            eval_set=[(x_train[fit_rows], train.labels[fit_rows, i]), (x_train[stop_rows], train.labels[stop_rows, i])],
            sample_weight_eval_set=[weights[fit_rows], weights[stop_rows]],
            verbose=False,
        )
        q[:, i] = model.predict_proba(x_eval)[:, 1]
        history = model.evals_result()
        curves[action.name] = {"train": history["validation_0"]["logloss"], "holdout": history["validation_1"]["logloss"]}
        details[action.name] = {"best_iteration": int(model.best_iteration), "rounds": len(curves[action.name]["train"])}
        logger.info("xgboost action=%s best_iteration=%d", action.name, model.best_iteration)
    return FitResult(q=q, details=details, curves=curves), encoder.feature_names()
