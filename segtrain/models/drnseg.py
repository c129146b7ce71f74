"""DRN segmentation model (Yu et al., CVPR 2017, and the official DRN segmentation code).

The stride-8 DRN output goes through a 1x1 classifier and is upsampled x8 by a grouped transposed
convolution initialised to bilinear interpolation and kept frozen.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.upsample import bilinear_upsampler
from segtrain.models.segmentor import Segmentor


class DRNSeg(Segmentor):
    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__(backbone, num_classes)
        stride = backbone.strides[-1]
        # The transposed conv gives exactly `stride` x its input; pad inputs to a multiple of it.
        backbone.size_divisor = max(backbone.size_divisor, stride)
        self.classifier = nn.Conv2d(backbone.channels[-1], num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0.0, math.sqrt(2.0 / num_classes))
        nn.init.zeros_(self.classifier.bias)
        self.upsample = bilinear_upsampler(num_classes, stride, trainable=False)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"out": self.upsample(self.classifier(features[-1]))}
