"""HRNetV2 segmentation head (Wang et al., TPAMI 2020): all four resolutions fused at stride 4."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.blocks import conv_bn_relu
from segtrain.models.resize import resize_to
from segtrain.models.segmentor import Segmentor


class HRNetV2(Segmentor):
    """Upsample the four branch outputs bilinearly to the finest one, concatenate, 1x1 conv-BN-ReLU
    (keeping the channel count), 1x1 classifier."""

    def __init__(self, backbone: Backbone, num_classes: int, branches: int = 4) -> None:
        super().__init__(backbone, num_classes)
        if not 1 <= branches <= len(backbone.channels):
            raise ConfigError(
                f"model.branches={branches}: HRNetV2 fuses that many backbone features, and this backbone gives "
                f"{len(backbone.channels)}; use backbone=hrnet_w18|hrnet_w32|hrnet_w48 (4 branches) or set "
                f"model.branches between 1 and {len(backbone.channels)}"
            )
        self.branches = branches
        width = sum(backbone.channels[-branches:])
        self.fuse = conv_bn_relu(width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        branches = features[-self.branches:]
        size = branches[0].shape[-2:]
        fused = torch.cat([branches[0]] + [resize_to(b, size) for b in branches[1:]], dim=1)
        return {"out": self.classifier(self.fuse(fused))}
