"""HRNetV2 + OCR (Yuan, Chen and Wang, "Object-Contextual Representations for Semantic Segmentation",
ECCV 2020), with the layer widths of HRNet-Semantic-Segmentation's HRNet-OCR branch
(lib/models/seg_hrnet_ocr.py, MODEL.OCR defaults in lib/config/default.py).

The four HRNet branches are upsampled to stride 4 and concatenated (720 channels for W48), then:
1. soft object regions: an auxiliary head (1x1 conv with bias, BN, ReLU, 1x1 classifier) gives one
   coarse score map per class; it is supervised in training (output "aux", loss weight 0.4 in the
   official configs' LOSS.BALANCE_WEIGHTS [0.4, 1]) and is used by the OCR module in every mode;
2. pixel representations: 3x3 conv (with bias) -> BN -> ReLU to `mid_channels` (512);
3. object region representations: per class, the average of the pixel representations weighted by
   the softmax of that class's region scores over all pixels (SpatialGather);
4. pixel-region relation: attention of every pixel (query: two 1x1 conv-BN-ReLU to `key_channels`,
   256) over the regions (key: the same on the region representations; value: one 1x1 conv-BN-ReLU),
   scaled by key_channels^-1/2, softmax over regions; the context goes back to `mid_channels` by
   1x1 conv-BN-ReLU (ObjectAttentionBlock);
5. OCR output: [context, pixel representation] -> 1x1 conv-BN-ReLU -> Dropout2d(0.05) -> classifier.

The official checkpoints' layout (segtrain.models.official) loads into this module: every tensor
of the official network has its place here, biases included (parameter counts are the official ones).
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.blocks import conv_bn_relu
from segtrain.models.resize import resize_to
from segtrain.models.segmentor import Segmentor, check_dropout


def region_representations(features: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
    """(N, C, K, 1): for each of the K regions, the mean of `features` (N, C, H, W) weighted by the
    softmax over all pixels of that region's logits (N, K, H, W). The trailing 1 lets 1x1 convolutions
    transform the K region vectors as they transform pixels."""
    weights = region_logits.flatten(2).softmax(dim=2)  # N, K, HW: each region's weights sum to 1
    gathered = torch.bmm(weights, features.flatten(2).transpose(1, 2))  # N, K, C
    return gathered.transpose(1, 2).unsqueeze(3)


class ObjectAttention(nn.Module):
    """Pixel-region relation: each pixel attends over the K region representations and receives their
    value-weighted sum, projected back to the pixel width."""

    def __init__(self, channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.query = nn.Sequential(conv_bn_relu(channels, key_channels), conv_bn_relu(key_channels, key_channels))
        self.key = nn.Sequential(conv_bn_relu(channels, key_channels), conv_bn_relu(key_channels, key_channels))
        self.value = conv_bn_relu(channels, key_channels)
        self.project = conv_bn_relu(key_channels, channels)

    def forward(self, pixels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        query = self.query(pixels).flatten(2).transpose(1, 2)  # N, HW, key
        key = self.key(regions).flatten(2)  # N, key, K
        value = self.value(regions).flatten(2).transpose(1, 2)  # N, K, key
        relation = (torch.bmm(query, key) * self.key_channels ** -0.5).softmax(dim=-1)  # N, HW, K
        context = torch.bmm(relation, value).transpose(1, 2).reshape(batch, self.key_channels, height, width)
        return self.project(context)


class HRNetOCR(Segmentor):
    """HRNetV2 features -> soft object regions (auxiliary head) -> object-contextual representations.

    Returns {"out"} (stride-4 OCR logits brought to the input size), plus {"aux"} (the region logits,
    supervised with `loss.aux_weight`) in training mode. `align_corners` is the convention of every
    bilinear resize of the head and of the final logits (the official OCR configs leave
    MODEL.ALIGN_CORNERS at its default, true).
    """

    def __init__(self, backbone: Backbone, num_classes: int, mid_channels: int = 512, key_channels: int = 256,
                 dropout: float = 0.05, align_corners: bool = False) -> None:
        super().__init__(backbone, num_classes, align_corners)
        check_dropout(dropout)
        for key, value in (("mid_channels", mid_channels), ("key_channels", key_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r}: a positive channel count (the official 512 and 256)")
        if len(backbone.channels) != 4:
            raise ConfigError(f"model=hrnet_ocr fuses the four HRNet branches; this backbone gives "
                              f"{len(backbone.channels)} features: use backbone=hrnet_w18|hrnet_w32|hrnet_w48")
        width = sum(backbone.channels)
        self.aux_head = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.Conv2d(width, num_classes, 1))
        self.pixels = nn.Sequential(nn.Conv2d(width, mid_channels, 3, padding=1), nn.BatchNorm2d(mid_channels),
                                    nn.ReLU(inplace=True))
        self.attention = ObjectAttention(mid_channels, key_channels)
        self.fuse = nn.Sequential(conv_bn_relu(2 * mid_channels, mid_channels), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def auxiliary_outputs(self) -> tuple[str, ...]:
        return ("aux",)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        size = features[0].shape[-2:]
        fused = torch.cat([features[0]] + [resize_to(f, size, self.align_corners) for f in features[1:]], dim=1)
        region_logits = self.aux_head(fused)
        pixels = self.pixels(fused)
        context = self.attention(pixels, region_representations(pixels, region_logits))
        outputs = {"out": self.classifier(self.fuse(torch.cat([context, pixels], dim=1)))}
        if self.training:
            outputs["aux"] = region_logits
        return outputs
