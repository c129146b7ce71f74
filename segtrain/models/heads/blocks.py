"""Convolution blocks the heads and models share: conv-BN-ReLU, plain or depthwise-separable."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) -> BN -> ReLU, padded so the output keeps the input's size."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def separable_conv_bn_relu(in_ch: int, out_ch: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (dilated) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, as in DeepLab v3+."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, padding=dilation, dilation=dilation, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def conv3x3_bn_relu(in_ch: int, out_ch: int, dilation: int = 1, separable: bool = False) -> nn.Sequential:
    """A 3x3 conv-BN-ReLU, depthwise-separable where the head asks for it (DeepLab v3+ with Xception)."""
    if separable:
        return separable_conv_bn_relu(in_ch, out_ch, dilation)
    return conv_bn_relu(in_ch, out_ch, 3, dilation)
