"""DeepLab v3 (Chen et al., arXiv 2017) and v3+ (Chen et al., ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.aspp import ASPP, conv3x3_bn_relu, conv_bn_relu, scaled_rates
from segtrain.models.resize import resize_to
from segtrain.models.segmentor import Segmentor, check_dropout


class DeepLabV3(Segmentor):
    """ASPP (with image pooling) on the deepest feature, then a 1x1 classifier; no decoder."""

    def __init__(self, backbone: Backbone, num_classes: int, aspp_channels: int = 256,
                 aspp_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1, separable: bool = False) -> None:
        super().__init__(backbone, num_classes)
        check_dropout(dropout)
        rates = scaled_rates(list(aspp_rates), backbone.strides[-1])
        self.aspp = ASPP(backbone.channels[-1], aspp_channels, rates, dropout, separable)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"out": self.classifier(self.aspp(features[-1]))}


class DeepLabV3Plus(DeepLabV3):
    """DeepLab v3 encoder + decoder fusing the ASPP output with the stride-4 feature.

    With `separable=true` (the paper's Xception-65 setting) the ASPP's 3x3 branches and the
    decoder's two 3x3 convolutions are depthwise-separable, each part followed by BN and ReLU.
    """

    def __init__(self, backbone: Backbone, num_classes: int, aspp_channels: int = 256,
                 aspp_rates: Sequence[int] = (6, 12, 18), decoder_channels: int = 256, low_level_channels: int = 48,
                 dropout: float = 0.1, separable: bool = False) -> None:
        super().__init__(backbone, num_classes, aspp_channels, aspp_rates, dropout, separable)
        if 4 not in backbone.strides:
            raise ConfigError(
                f"backbone: DeepLab v3+ decodes with a stride-4 feature, but this backbone's features have strides "
                f"{backbone.strides}; use a backbone with a stride-4 level (resnet18/34/50/101, xception65, "
                "hrnet_w*, dla*, drn_*; for backbone=timm include it in backbone.out_indices) or model=deeplabv3"
            )
        self.low_level_index = backbone.strides.index(4)
        self.low_level = conv_bn_relu(backbone.channels[self.low_level_index], low_level_channels)
        self.fuse = nn.Sequential(
            conv3x3_bn_relu(aspp_channels + low_level_channels, decoder_channels, separable=separable),
            conv3x3_bn_relu(decoder_channels, decoder_channels, separable=separable),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        low = self.low_level(features[self.low_level_index])
        high = resize_to(self.aspp(features[-1]), low.shape[-2:])
        return {"out": self.classifier(self.fuse(torch.cat([high, low], dim=1)))}
