"""Periodic checkpoints, exact resume, keep-last, interrupted saves and world-size changes.

Every run trains the tiny model of checkpoint_runs on CPU with gloo: 2,000 training rows,
batch 64, 2 epochs, a checkpoint every 10 steps (32 steps per epoch on 1 rank, 16 on 2 ranks).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from checkpoint_runs import copy_checkpoint, predictions, run_training, step_losses, write_config, write_data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run on 1 rank and one on 2 ranks, every checkpoint kept."""
    root = tmp_path_factory.mktemp("checkpoint_runs")
    data = write_data(root / "data")
    config = write_config(root / "config.toml")
    one = run_training(1, config, data, root / "one_rank")
    two = run_training(2, config, data, root / "two_ranks")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return {"root": root, "data": data, "config": config, "one": root / "one_rank", "two": root / "two_ranks"}


def _checkpoint_steps(out) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in (out / "checkpoints").iterdir())


def test_periodic_and_final_checkpoints(runs):
    assert _checkpoint_steps(runs["one"]) == [10, 20, 30, 40, 50, 60, 64]


def test_checkpoint_holds_position_and_world_size(runs):
    metadata = json.loads((runs["two"] / "checkpoints" / "step-00000020" / "valuerank.json").read_text())

    assert metadata["position"] == {"step": 20, "epoch": 1, "batch_in_epoch": 4}
    assert metadata["world_size"] == 2


def test_checkpoint_holds_rng_and_hyperparameters(runs):
    folder = runs["two"] / "checkpoints" / "step-00000020"

    assert (folder / "rng-rank0.pt").is_file()
    assert (folder / "rng-rank1.pt").is_file()
    assert (folder / "hyperparameters.pt").is_file()


def test_resume_matches_uninterrupted_losses(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 30, tmp_path / "resumed")

    result = run_training(1, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = step_losses(runs["one"])
    resumed = step_losses(out)
    assert sorted(resumed) == list(range(31, 65))
    worst = max(abs(resumed[step] - uninterrupted[step]) for step in resumed)
    assert worst <= 1e-6, f"largest loss difference after resume: {worst}"


def test_resume_matches_uninterrupted_predictions(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 30, tmp_path / "resumed")

    result = run_training(1, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    expected = predictions(runs["one"])
    got = predictions(out)
    worst = max(float(np.abs(got[key] - expected[key]).max()) for key in expected)
    assert worst <= 1e-6


def test_keep_last_checkpoints(runs, tmp_path):
    result = run_training(1, runs["config"], runs["data"], tmp_path / "out", "training.keep_last_checkpoints=2")

    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "out") == [60, 64]


def test_half_written_checkpoint_ignored(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 30, tmp_path / "resumed")
    # A save killed before rank 0 renamed it: shard files present, no DCP metadata.
    half = out / "checkpoints" / ".tmp-step-00000040"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")

    result = run_training(1, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert min(step_losses(out)) == 31
    assert not half.exists()


def test_finished_run_starts_over(runs, tmp_path):
    out = tmp_path / "out"
    first = run_training(1, runs["config"], runs["data"], out, "training.epochs=1")
    second = run_training(1, runs["config"], runs["data"], out, "training.epochs=1")

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" not in second.stderr
    assert min(step_losses(out)) == 1


def test_resume_off_starts_over(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 30, tmp_path / "out")

    result = run_training(1, runs["config"], runs["data"], out, "training.resume=false")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" not in result.stderr
    assert min(step_losses(out)) == 1


def test_changed_model_config_rejected(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 30, tmp_path / "out")

    result = run_training(1, runs["config"], runs["data"], out, "sparse_features.0.embedding_dim=16")

    assert result.returncode == 2
    assert "different 'sparse_features' section" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_rank_checkpoint_continues_on_one_rank(runs, tmp_path):
    out = copy_checkpoint(runs["two"], 20, tmp_path / "out")

    result = run_training(1, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved by 2 rank(s)" in result.stderr
    # Step 20 of 2 ranks is epoch 1, batch 4 of 16; on 1 rank that is batch 8 of 32.
    first = json.loads((out / "steps" / "rank-0.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["epoch"], first["batch"]) == (21, 1, 8)
    assert (out / "metrics.json").is_file()


def test_two_rank_weights_predict_same_on_one_rank(runs, tmp_path):
    # The final checkpoint leaves no step to train, so evaluation uses the loaded weights as they are.
    out = copy_checkpoint(runs["two"], 32, tmp_path / "out")

    result = run_training(1, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    expected = predictions(runs["two"])
    got = predictions(out)
    assert max(float(np.abs(got[key] - expected[key]).max()) for key in expected) <= 1e-6


def test_one_rank_weights_predict_same_on_two_ranks(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 64, tmp_path / "out")

    result = run_training(2, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved by 1 rank(s)" in result.stderr
    expected = predictions(runs["one"])
    got = predictions(out)
    assert max(float(np.abs(got[key] - expected[key]).max()) for key in expected) <= 1e-6


def test_one_rank_checkpoint_continues_on_two_ranks(runs, tmp_path):
    out = copy_checkpoint(runs["one"], 30, tmp_path / "out")

    result = run_training(2, runs["config"], runs["data"], out)

    assert result.returncode == 0, result.stderr[-3000:]
    # Step 30 of 1 rank is epoch 0, batch 30 of 32; on 2 ranks that is batch 15 of 16.
    first = json.loads((out / "steps" / "rank-1.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["epoch"], first["batch"]) == (31, 0, 15)
