"""Shared-bottom and MMoE models: gates, task weights, parameter names, and 2-rank training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_ranking_data import write_config, write_splits
from trainer.data import SplitData
from trainer.loss import multitask_loss
from trainer.model import MultiTaskModel
from valuerank.config import ConfigError, load_config


@pytest.fixture
def tiny(tmp_path):
    return write_splits(tmp_path), write_config(tmp_path)


def _train_in_process(model: MultiTaskModel, cfg, data: SplitData, steps: int) -> None:
    """Train the unsharded model for a few real steps with the trainer's loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    task_weights = torch.tensor([a.task_weight for a in cfg.actions])
    batches = data.train_batches(epoch=0, rank=0, world_size=1, batch_size=cfg.training.batch_size, seed=0)
    for _, batch in zip(range(steps), batches):
        logits = model(batch.dense, batch.sparse)
        loss, _ = multitask_loss(logits, batch.labels, batch.label_mask, torch.ones_like(batch.weights), task_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_mmoe_gates_sum_to_one(tiny):
    data_dir, config = tiny
    cfg = load_config(config, ["model.architecture=\"mmoe\""])
    torch.manual_seed(0)
    model = MultiTaskModel(cfg)
    train = SplitData(data_dir / "train", cfg)
    _train_in_process(model, cfg, train, steps=8)
    batch = next(SplitData(data_dir / "eval", cfg, dense_stats=train.dense_stats).eval_batches(0, 1, 200))

    gates = model.gate_weights(batch.dense, batch.sparse)

    assert gates.shape == (200, 3, 3)
    assert torch.allclose(gates.sum(dim=2), torch.ones(200, 3), atol=1e-6)
    assert (gates >= 0).all()
    assert not torch.allclose(gates[:, 0], gates[:, 1])


def test_mmoe_output_mixes_experts_by_gate(tiny):
    data_dir, config = tiny
    cfg = load_config(config, ["model.architecture=\"mmoe\""])
    torch.manual_seed(0)
    model = MultiTaskModel(cfg).eval()
    batch = next(SplitData(data_dir / "eval", cfg).eval_batches(0, 1, 16))
    features = torch.cat([model.ebc(batch.sparse).values(), batch.dense], dim=1)

    gates = model.gate_weights(batch.dense, batch.sparse)
    experts = torch.stack([expert(features) for expert in model.experts], dim=1)
    like_input = (gates[:, 1, :, None] * experts).sum(dim=1)
    expected = model.towers[1](like_input)[:, 0]

    assert torch.allclose(model(batch.dense, batch.sparse)[:, 1], expected, atol=1e-6)


def test_zero_task_weight_leaves_tower_untrained(tiny):
    data_dir, config = tiny
    cfg = load_config(config, ["model.architecture=\"mmoe\"", "actions.2.task_weight=0.0"])
    torch.manual_seed(0)
    model = MultiTaskModel(cfg)
    before = [p.detach().clone() for p in model.towers[2].parameters()]
    like_before = [p.detach().clone() for p in model.towers[1].parameters()]

    _train_in_process(model, cfg, SplitData(data_dir / "train", cfg), steps=5)

    assert all(torch.equal(b, p) for b, p in zip(before, model.towers[2].parameters()))
    assert not all(torch.equal(b, p) for b, p in zip(like_before, model.towers[1].parameters()))


def test_shared_bottom_is_default_with_old_names(tiny):
    _, config = tiny
    cfg = load_config(config)

    names = set(MultiTaskModel(cfg).state_dict())

    assert cfg.model.architecture == "shared_bottom"
    assert "shared.0.weight" in names
    assert not any(name.startswith(("experts.", "gates.")) for name in names)


def test_shared_bottom_has_no_gates(tiny):
    data_dir, config = tiny
    cfg = load_config(config)
    model = MultiTaskModel(cfg)
    batch = next(SplitData(data_dir / "eval", cfg).eval_batches(0, 1, 8))

    with pytest.raises(ValueError, match="exist only for 'mmoe'"):
        model.gate_weights(batch.dense, batch.sparse)


def test_mmoe_rejects_zero_experts(tiny):
    _, config = tiny

    with pytest.raises(ConfigError, match="model.num_experts"):
        load_config(config, ["model.architecture=\"mmoe\"", "model.num_experts=0"])


def test_unknown_architecture_rejected(tiny):
    _, config = tiny

    with pytest.raises(ConfigError, match="expected one of 'shared_bottom', 'mmoe'"):
        load_config(config, ["model.architecture=\"moe\""])


def test_mmoe_trains_on_two_ranks(tiny, tmp_path):
    data_dir, config = tiny
    out = tmp_path / "mmoe"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "trainer.train", "--config", str(config), "--data", str(data_dir), "--out", str(out),
        "--override", "model.architecture=\"mmoe\"", "--override", "training.epochs=10",
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))

    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    saved = json.loads((Path(metrics["checkpoint"]) / "valuerank.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["rows"] == 200
    assert saved["config"]["model"]["architecture"] == "mmoe"
    assert metrics["actions"]["like"]["auc"] > 0.6
    assert 0.0 <= metrics["value_score"]["ranking"]["ndcg"] <= 1.0
    assert np.isfinite(metrics["training"]["final_loss"])
