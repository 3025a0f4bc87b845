"""End to end on the real KuaiRand log: adapter, label join, downsampling, 2-rank torchrun training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from valuerank.adapters import kuairand
from valuerank.config import load_config
from valuerank.pipeline import PipelinePaths, run_spark_stages, run_training

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "kuairand.toml"
LOG = ROOT.parent / "shared" / "datasets" / "kuairand-likehate" / "log.tsv"


def _read(path: Path):
    return ds.dataset(str(path), format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory):
    if not LOG.exists():
        pytest.skip(f"KuaiRand log not found at {LOG}; the shared datasets folder is needed for this test")
    cfg = load_config(CONFIG)
    out = tmp_path_factory.mktemp("kuairand")
    kuairand.convert(LOG, out / "raw")
    paths = PipelinePaths(out)
    join_manifest, down_manifest = run_spark_stages(cfg, out / "raw" / "impressions", out / "raw" / "events", paths)
    run_training(CONFIG, paths, nproc_per_node=2, overrides=[])
    metrics = json.loads((paths.model / "metrics.json").read_text())
    return cfg, paths, join_manifest, down_manifest, metrics


def test_label_join_accounts_for_every_row(run):
    _, paths, join, _, _ = run
    impressions = join["impressions"]
    events = join["events"]

    assert impressions["rows_in"] == 41_828
    assert impressions["rows_in"] == impressions["rows_out"] + sum(impressions["dropped"].values()) + sum(impressions["held_back"].values())
    assert events["rows_in"] == events["attributed"] + events["attributed_to_held_back"] + sum(events["dropped"].values())
    assert len(_read(paths.labelled)) == impressions["rows_out"]


def test_downsample_accounts_for_every_row(run):
    _, paths, join, down, _ = run

    assert down["rows_in"] == join["impressions"]["rows_out"]
    assert down["rows_in"] == down["train"]["rows_in"] + down["eval"]["rows_in"]
    assert down["train"]["rows_in"] == down["train"]["rows_out"] + sum(down["train"]["dropped"].values())
    assert len(_read(paths.downsampled / "train")) == down["train"]["rows_out"]


def test_downsample_keeps_every_positive(run):
    cfg, paths, _, down, _ = run
    labelled = _read(paths.labelled)
    train = _read(paths.downsampled / "train")
    eval_start = np.datetime64(down["split"]["eval_start"].replace("Z", "").replace("+00:00", ""))
    labelled_train = labelled[labelled["timestamp"].dt.tz_localize(None) < eval_start]

    for column in cfg.label_columns:
        assert train[column].sum() == labelled_train[column].sum(), column
    assert np.allclose(train["weight"], 1 / train["keep_rate"])


def test_eval_split_untouched(run):
    cfg, paths, _, down, _ = run
    labelled = _read(paths.labelled)
    eval_rows = _read(paths.downsampled / "eval")
    eval_start = np.datetime64(down["split"]["eval_start"].replace("Z", "").replace("+00:00", ""))
    expected = labelled[labelled["timestamp"].dt.tz_localize(None) >= eval_start]

    assert sorted(eval_rows["impression_id"]) == sorted(expected["impression_id"])
    assert (eval_rows["weight"] == 1.0).all()
    merged = expected.merge(eval_rows, on="impression_id", suffixes=("", "_eval"))
    for column in cfg.label_columns:
        assert (merged[column] == merged[f"{column}_eval"]).all(), column


def test_auc_above_chance_for_click_and_like(run):
    _, _, _, _, metrics = run

    assert metrics["world_size"] == 2
    assert metrics["actions"]["click"]["auc"] > 0.6
    assert metrics["actions"]["like"]["auc"] > 0.6


def test_value_score_uses_configured_weights(run):
    cfg, paths, _, _, metrics = run
    predictions = _read(paths.model / "predictions")
    expected = sum(a.value_weight * predictions[f"p_{a.name}"] for a in cfg.actions)

    assert np.allclose(predictions["value_score"], expected)
    assert metrics["value_score"]["weights"] == {a.name: a.value_weight for a in cfg.actions}


def test_evaluation_covers_every_eval_row_once(run):
    _, paths, _, _, metrics = run
    predictions = _read(paths.model / "predictions")
    eval_rows = _read(paths.downsampled / "eval")

    assert metrics["rows"] == len(eval_rows)
    assert sorted(predictions["impression_id"]) == sorted(eval_rows["impression_id"])


def test_outputs_written(run):
    _, paths, _, _, _ = run

    assert (paths.model / "plots" / "calibration.png").stat().st_size > 0
    assert (paths.model / "plots" / "training_curve.png").stat().st_size > 0
    assert list((paths.model / "checkpoints").glob("step-*/.metadata"))
    assert list((paths.model / "tensorboard").iterdir())
