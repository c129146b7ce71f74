"""Cross-entropy over the main output plus the weighted auxiliary output, ignoring label 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, aux_weight: float = 0.0, ignore_index: int = 255
) -> torch.Tensor:
    loss = F.cross_entropy(outputs["out"], target, ignore_index=ignore_index)
    if "aux" in outputs and aux_weight > 0:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"], target, ignore_index=ignore_index)
    return loss
