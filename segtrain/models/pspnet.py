"""PSPNet (Zhao et al., CVPR 2017): pyramid pooling on a dilated ResNet, auxiliary FCN head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.blocks import conv_bn_relu
from segtrain.models.resize import resize_to
from segtrain.models.segmentor import Segmentor, check_dropout


class PyramidPooling(nn.Module):
    """Average-pool to bins x bins, reduce to in/len(bins) channels, upsample, concatenate with input."""

    def __init__(self, in_ch: int, bins: Sequence[int], align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        reduced = in_ch // len(bins)
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_ch, reduced)) for b in bins)
        self.out_channels = in_ch + reduced * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [resize_to(stage(x), x.shape[-2:], self.align_corners) for stage in self.stages], dim=1)


def fcn_head(in_ch: int, mid_ch: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_ch, mid_ch, 3), nn.Dropout2d(dropout), nn.Conv2d(mid_ch, num_classes, 1))


class PSPNet(Segmentor):
    """PPM (bins 1, 2, 3, 6) -> 3x3 conv-BN-ReLU-dropout -> classifier; aux FCN on the penultimate stage.

    The auxiliary head runs only in training mode (its loss weight is `loss.aux_weight`, 0.4 in
    the paper); in evaluation the model returns the main logits only.
    """

    def __init__(self, backbone: Backbone, num_classes: int, bins: Sequence[int] = (1, 2, 3, 6),
                 channels: int = 512, dropout: float = 0.1, aux: bool = True, aux_channels: int = 256,
                 aux_index: int = -2, align_corners: bool = False) -> None:
        super().__init__(backbone, num_classes, align_corners)
        check_dropout(dropout)
        if not bins or min(bins) < 1:
            raise ConfigError(f"model.bins must be a non-empty list of pooled sizes >= 1 (the paper's [1, 2, 3, 6]); "
                              f"got {list(bins)}")
        if aux and not -len(backbone.channels) <= aux_index < len(backbone.channels):
            raise ConfigError(f"model.aux_index={aux_index} picks no feature: this backbone gives "
                              f"{len(backbone.channels)} features; use -2 (a ResNet's layer3) or set model.aux=false")
        self.ppm = PyramidPooling(backbone.channels[-1], bins, self.align_corners)
        self.head = fcn_head(self.ppm.out_channels, channels, num_classes, dropout)
        self.aux_index = aux_index
        self.aux_head = fcn_head(backbone.channels[aux_index], aux_channels, num_classes, dropout) if aux else None

    def auxiliary_outputs(self) -> tuple[str, ...]:
        return ("aux",) if self.aux_head is not None else ()

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {"out": self.head(self.ppm(features[-1]))}
        if self.training and self.aux_head is not None:
            outputs["aux"] = self.aux_head(features[self.aux_index])
        return outputs
