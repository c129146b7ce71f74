"""Cross-entropy over the main output plus the weighted auxiliary output, ignoring label 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    aux_weight: float = 0.0,
    ignore_index: int = 255,
    normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels; with `normalizer`, the sum divided by it instead.

    The training loop passes the number of labelled pixels of the whole global batch (all
    accumulation steps and processes), so that any split of the batch gives the loss, and the
    gradient, of one big batch.
    """
    reduction = "mean" if normalizer is None else "sum"

    def term(logits: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
        return loss if normalizer is None else loss / normalizer

    loss = term(outputs["out"])
    if "aux" in outputs and aux_weight > 0:
        loss = loss + aux_weight * term(outputs["aux"])
    return loss
