"""Checkpoint helpers without a process group: positions, folder discovery, config checks."""

from __future__ import annotations

import copy

import pytest

from trainer.checkpoint import (
    CheckpointError, TrainingPosition, convert_position, latest_checkpoint, list_checkpoints, resolve_checkpoint,
)
from valuerank.config import ConfigError, config_from_dict

BASE = {
    "actions": [{"name": "click", "attribution_window": "1h"}],
    "sparse_features": [{"name": "user", "column": "user_id", "num_embeddings": 10}],
    "split": {"eval_days": 1},
}


def _complete(root, step):
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    (folder / "valuerank.json").write_text("{}")
    return folder


def test_position_advances_within_epoch():
    assert TrainingPosition(4, 0, 4).advanced(10) == TrainingPosition(5, 0, 5)


def test_position_advances_to_next_epoch():
    assert TrainingPosition(9, 0, 9).advanced(10) == TrainingPosition(10, 1, 0)


def test_convert_position_same_world_size():
    assert convert_position(TrainingPosition(30, 0, 30), 1, 1, 32) == TrainingPosition(30, 0, 30)


def test_convert_position_to_more_ranks():
    assert convert_position(TrainingPosition(30, 0, 30), 1, 2, 16) == TrainingPosition(30, 0, 15)


def test_convert_position_to_fewer_ranks():
    assert convert_position(TrainingPosition(20, 1, 4), 2, 1, 32) == TrainingPosition(20, 1, 8)


def test_convert_position_past_epoch_end():
    assert convert_position(TrainingPosition(31, 0, 31), 1, 2, 15) == TrainingPosition(31, 1, 0)


def test_list_checkpoints_sorted_by_step(tmp_path):
    for step in (100, 20, 3):
        _complete(tmp_path, step)

    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000020", "step-00000100"]


def test_incomplete_folders_ignored(tmp_path):
    _complete(tmp_path, 10)
    (tmp_path / ".tmp-step-00000020").mkdir()
    (tmp_path / "step-00000030").mkdir()  # no DCP metadata

    assert latest_checkpoint(tmp_path).name == "step-00000010"


def test_resolve_checkpoint_from_run_folder(tmp_path):
    _complete(tmp_path / "checkpoints", 5)
    latest = _complete(tmp_path / "checkpoints", 7)

    assert resolve_checkpoint(tmp_path) == latest


def test_resolve_checkpoint_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint found"):
        resolve_checkpoint(tmp_path)


def test_managed_collision_rejected_on_cpu():
    data = {**copy.deepcopy(BASE), "sparse_features": [{**BASE["sparse_features"][0], "managed_collision": True}]}

    with pytest.raises(ConfigError, match="row_wise sharding, which does not plan on cpu"):
        config_from_dict(data)


def test_checkpoint_interval_negative_rejected():
    with pytest.raises(ConfigError, match="training.checkpoint_every_steps"):
        config_from_dict(copy.deepcopy(BASE), ["training.checkpoint_every_steps=-1"])


def test_keep_last_zero_rejected():
    with pytest.raises(ConfigError, match="training.keep_last_checkpoints"):
        config_from_dict(copy.deepcopy(BASE), ["training.keep_last_checkpoints=0"])


def test_checkpoint_defaults():
    training = config_from_dict(copy.deepcopy(BASE)).training

    assert (training.checkpoint_every_steps, training.keep_last_checkpoints, training.resume) == (500, 3, True)
