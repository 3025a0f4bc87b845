"""The model form that torchrec's TrainPipelineSparseDist drives: ``forward(batch) -> (loss, output)``.

TrainPipelineSparseDist traces the model's forward with torch.fx and finds the sharded
embedding lookup's input as ``batch.sparse``. It then starts the input distribution
(all-to-all of ids) of batch i + 1 while batch i computes, and copies batch i + 2 to the
device on a side stream. On CPU it runs the same steps without streams, so one loop
serves CPU (gloo) and GPU (nccl).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.data import Batch
from trainer.loss import multitask_loss
from trainer.model import MultiTaskModel
from valuerank.config import PipelineConfig


class StepOutput(NamedTuple):
    """Detached results of one step: total loss, per-action loss [A] and logits [B, A]."""

    loss: torch.Tensor
    per_action: torch.Tensor
    logits: torch.Tensor


class TrainingModel(MultiTaskModel):
    """MultiTaskModel whose forward takes a Batch and also computes the multi-task loss.

    It adds no parameters and no persistent buffers, so its state dict and checkpoints have
    the same keys as MultiTaskModel's.
    """

    def __init__(self, cfg: PipelineConfig, device: torch.device | None = None):
        super().__init__(cfg, device=device)
        task_weights = torch.tensor([a.task_weight for a in cfg.actions], dtype=torch.float32)
        self.register_buffer("task_weights", task_weights, persistent=False)
        self.weight_rows = cfg.training.loss_weighting == "inverse_keep_rate"

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        logits = self.logits(batch.dense, batch.sparse)
        row_weights = batch.weights if self.weight_rows else torch.ones_like(batch.weights)
        loss, per_action = multitask_loss(logits, batch.labels, batch.label_mask, row_weights, self.task_weights)
        return loss, StepOutput(loss.detach(), per_action, logits.detach())

    def logits(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        """Return logits [B, num_actions]: MultiTaskModel's forward."""
        return MultiTaskModel.forward(self, dense, sparse)
