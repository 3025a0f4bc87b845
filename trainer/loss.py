"""Multi-task loss: per-action weighted binary cross-entropy, summed with task weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multitask_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    row_weights: torch.Tensor,
    task_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (total loss, per-action loss [num_actions]).

    All inputs are [B, num_actions] except ``task_weights`` [num_actions]. Each action's
    loss is the weighted mean BCE over its eligible rows (``label_mask`` 1). An action
    with no eligible row in the batch contributes 0, not NaN: its denominator is clamped
    and its numerator is already 0.
    """
    weights = row_weights * label_mask
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    per_action = (bce * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)
    return (per_action * task_weights).sum(), per_action.detach()
