"""DeepLab v3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution", ECCV 2018)."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.aspp import ASPP, conv_bn_relu, resize_to, scaled_rates
from segtrain.models.segmentor import Segmentor


class DeepLabV3Plus(Segmentor):
    """ASPP on the deepest feature, decoder fusing it with the stride-4 feature, 1x1 classifier."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aspp_channels: int = 256,
        aspp_rates: list[int] = (6, 12, 18),
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(backbone, num_classes)
        if 4 not in backbone.strides:
            raise ValueError(f"DeepLab v3+ needs a stride-4 feature; backbone strides {backbone.strides}")
        self.low_level_index = backbone.strides.index(4)
        output_stride = backbone.strides[-1]
        self.aspp = ASPP(backbone.channels[-1], aspp_channels, scaled_rates(list(aspp_rates), output_stride),
                         dropout)
        self.low_level = conv_bn_relu(backbone.channels[self.low_level_index], low_level_channels)
        self.fuse = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        low = self.low_level(features[self.low_level_index])
        high = resize_to(self.aspp(features[-1]), low.shape[-2:])
        return {"out": self.classifier(self.fuse(torch.cat([high, low], dim=1)))}
