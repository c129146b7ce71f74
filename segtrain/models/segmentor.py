"""Backbone + head: the common shape of every segmentation model in segtrain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones.base import Backbone
from segtrain.models.resize import resize_to


class Segmentor(nn.Module):
    """Runs `backbone` then `decode(features)`; returns {"out": logits at the input size}.

    The input is zero-padded at the bottom/right to the backbone's size divisor and the logits are
    cropped back, so any input size (513x513 included) gives logits of exactly that size. Logits are
    returned in float32 so the loss is computed in full precision under autocast.
    """

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        div = self.backbone.size_divisor
        pad_h, pad_w = (-height) % div, (-width) % div
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        outputs = self.decode(self.backbone(x))
        padded = (height + pad_h, width + pad_w)
        result = {}
        for key, logits in outputs.items():
            logits = resize_to(logits, padded)[..., :height, :width]
            result[key] = logits.float()
        return result

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in own]
