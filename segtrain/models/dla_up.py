"""DLA-Up (Yu et al., "Deep Layer Aggregation", CVPR 2018): iterative deep aggregation upsampling.

Starting from the coarsest level, each IDA stage projects the finer levels to a common width,
upsamples them to the finest level of the stage, and merges them one after another with 3x3 nodes;
the merged maps become the inputs of the next, finer stage. The finest output (at stride
`down_ratio`) is classified and upsampled to the input size by a frozen bilinear transposed conv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.blocks import conv_bn_relu
from segtrain.models.heads.upsample import bilinear_upsampler
from segtrain.models.segmentor import Segmentor


class IDAUp(nn.Module):
    """Merge maps of `in_channels` at relative scales `factors` (first = finest) into `width` channels."""

    def __init__(self, width: int, in_channels: Sequence[int], factors: Sequence[int], node_kernel: int = 3) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Identity() if c == width else conv_bn_relu(c, width) for c in in_channels)
        self.upsample = nn.ModuleList(
            nn.Identity() if f == 1 else bilinear_upsampler(width, int(f), trainable=True) for f in factors
        )
        self.nodes = nn.ModuleList(conv_bn_relu(2 * width, width, node_kernel) for _ in in_channels[1:])

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Returns the successive merges; the last one aggregates every input."""
        aligned = [up(proj(m)) for m, proj, up in zip(maps, self.project, self.upsample)]
        merged, outputs = aligned[0], []
        for node, m in zip(self.nodes, aligned[1:]):
            merged = node(torch.cat([merged, m], dim=1))
            outputs.append(merged)
        return outputs


class DLAUpDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        channels, scales = list(channels), [s // strides[0] for s in strides]
        in_channels = list(channels)
        stages = []
        for start in range(len(channels) - 2, -1, -1):
            factors = [scales[k] // scales[start] for k in range(start, len(channels))]
            stages.append(IDAUp(channels[start], in_channels[start:], factors))
            # After this stage, every level from `start` on lives at the scale and width of `start`.
            for k in range(start + 1, len(channels)):
                scales[k], in_channels[k] = scales[start], channels[start]
        self.stages = nn.ModuleList(stages)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        maps = list(maps)
        n = len(maps)
        for step, stage in enumerate(self.stages):
            start = n - 2 - step
            maps[start + 1:] = stage(maps[start:])
        return maps[-1]


class DLAUp(Segmentor):
    def __init__(self, backbone: Backbone, num_classes: int, down_ratio: int = 2) -> None:
        super().__init__(backbone, num_classes)
        if down_ratio not in (2, 4, 8):
            raise ConfigError(f"model.down_ratio must be 2, 4 or 8, got {down_ratio}")
        if down_ratio not in backbone.strides:
            fitting = [r for r in (2, 4, 8) if r in backbone.strides]
            raise ConfigError(
                f"model.down_ratio={down_ratio} needs a backbone feature at stride {down_ratio}, but this backbone's "
                f"strides are {backbone.strides}; DLA-Up is made for backbone=dla34|dla60|dla102 (strides 2 to 32)"
                + (f", or set model.down_ratio to one of {fitting}" if fitting else "")
            )
        self.first = backbone.strides.index(down_ratio)
        channels, strides = backbone.channels[self.first:], backbone.strides[self.first:]
        self.decoder = DLAUpDecoder(channels, strides)
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0.0, math.sqrt(2.0 / num_classes))
        nn.init.zeros_(self.classifier.bias)
        self.upsample = bilinear_upsampler(num_classes, down_ratio, trainable=False)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"out": self.upsample(self.classifier(self.decoder(features[self.first:])))}
