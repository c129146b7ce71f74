"""The loss contract: `pass_total` and `normalizer` define a loss (see segtrain.losses)."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.errors import ConfigError


class SegmentationLoss(nn.Module):
    """Base class: `pass_total` and `normalizer` define a loss; `forward` adds the auxiliary terms."""

    def __init__(self, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ConfigError(f"loss.aux_weight must be >= 0, got {aux_weight}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = float(aux_weight)

    def pass_total(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def normalizer(self, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, normalizer: torch.Tensor | None = None
    ) -> torch.Tensor:
        if normalizer is None:
            normalizer = self.normalizer(target).clamp(min=1e-12)
        loss = self.pass_total(outputs["out"], target)
        if self.aux_weight > 0:
            for key, logits in outputs.items():
                if key != "out":
                    loss = loss + self.aux_weight * self.pass_total(logits, target)
        return loss / normalizer
