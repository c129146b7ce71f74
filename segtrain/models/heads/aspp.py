"""Atrous Spatial Pyramid Pooling (DeepLab v3): parallel dilated convolutions plus image pooling."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.heads.blocks import conv3x3_bn_relu, conv_bn_relu


class ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv-BN-ReLU -> broadcast back to the feature size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = conv_bn_relu(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x)).expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, rates: list[int], dropout: float = 0.1,
                 separable: bool = False) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_ch, out_ch)]
        branches += [conv3x3_bn_relu(in_ch, out_ch, rate, separable) for rate in rates]
        branches.append(ImagePooling(in_ch, out_ch))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_relu(out_ch * len(branches), out_ch),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def scaled_rates(rates_at_os16: list[int], output_stride: int) -> list[int]:
    """ASPP rates are specified at output stride 16 and scale inversely with it (6/12/18 -> 12/24/36)."""
    return [int(r * 16 // output_stride) for r in rates_at_os16]
