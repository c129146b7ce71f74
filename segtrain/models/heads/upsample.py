"""Learned-or-fixed upsampling by a grouped transposed convolution initialised to bilinear interpolation."""

from __future__ import annotations

import torch
from torch import nn


def bilinear_kernel(size: int) -> torch.Tensor:
    """The size x size kernel with which a stride size/2 transposed conv performs bilinear upsampling."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    return torch.outer(ramp, ramp).float()


def bilinear_upsampler(channels: int, factor: int, trainable: bool) -> nn.ConvTranspose2d:
    """Per-channel (groups=channels) x`factor` upsampling; output size is exactly factor x input."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, groups=channels,
                            bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2 * factor).expand_as(up.weight))
    up.weight.requires_grad_(trainable)
    return up
