"""Dilated Residual Networks (Yu, Koltun, Funkhouser, CVPR 2017), written for segtrain.

Eight levels. Levels 1-2 hold the full-resolution stem (DRN-C: residual basic blocks after a 7x7
conv; DRN-D: plain conv-BN-ReLU layers), levels 3-4 downsample to stride 8, levels 5-6 keep stride 8
and dilate by 2 and 4, and levels 7-8 are the "de-gridding" levels: dilation 2 then 1, without
residual connections (DRN-C: basic blocks with the shortcut removed; DRN-D: plain convolutions).
Attribute names (conv1/bn1 or layer0, layer1..layer8, conv/bn/downsample inside blocks) follow
the official release so its ImageNet checkpoints load with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone, load_backbone_weights, weights_origin
from segtrain.models.backbones.weights import load_url_weights, torch_hub_file

CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)

# name -> (block kind, architecture, blocks per level)
ARCHS = {
    "drn_c_26": ("basic", "C", (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_c_42": ("basic", "C", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_c_58": ("bottleneck", "C", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_22": ("basic", "D", (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_d_38": ("basic", "D", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_54": ("bottleneck", "D", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_105": ("bottleneck", "D", (1, 1, 3, 4, 23, 3, 1, 1)),
}

# The official ImageNet checkpoints, at the host fyu/drn's drn.py names (`webroot`, since July 2019; plain
# http there). File names carry a SHA-256 prefix of their content, checked after every download.
WEIGHT_URLS = {
    "drn_c_26": "http://dl.yf.io/drn/drn_c_26-ddedf421.pth",
    "drn_c_42": "http://dl.yf.io/drn/drn_c_42-9d336e8c.pth",
    "drn_c_58": "http://dl.yf.io/drn/drn_c_58-0a53a92c.pth",
    "drn_d_22": "http://dl.yf.io/drn/drn_d_22-4bd2f8ea.pth",
    "drn_d_38": "http://dl.yf.io/drn/drn_d_38-eebb45f0.pth",
    "drn_d_54": "http://dl.yf.io/drn/drn_d_54-0e0534ff.pth",
    "drn_d_105": "http://dl.yf.io/drn/drn_d_105-12b40979.pth",
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: tuple[int, int] = (1, 1), residual: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, padding=dilation[0], dilation=dilation[0], bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation[1], dilation=dilation[1], bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: tuple[int, int] = (1, 1), residual: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation[1], dilation=dilation[1], bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class DRN(Backbone):
    """forward(x) -> [level-2 (stride 2), level-3 (stride 4), level-4 (stride 8), last level (stride 8)]."""

    def __init__(self, name: str = "drn_d_22", pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        if name not in ARCHS:
            raise ConfigError(f"backbone.name={name!r} is not a DRN; choose one of {sorted(ARCHS)}")
        kind, arch, blocks = ARCHS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.arch, self.name = arch, name
        self._in = CHANNELS[0]
        if arch == "C":
            self.conv1 = nn.Conv2d(3, CHANNELS[0], 7, 1, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(CHANNELS[0])
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = self._residual_level(BasicBlock, CHANNELS[0], blocks[0])
            self.layer2 = self._residual_level(BasicBlock, CHANNELS[1], blocks[1], stride=2)
        else:
            self.layer0 = nn.Sequential(
                nn.Conv2d(3, CHANNELS[0], 7, 1, padding=3, bias=False),
                nn.BatchNorm2d(CHANNELS[0]),
                nn.ReLU(inplace=True),
            )
            self.layer1 = self._conv_level(CHANNELS[0], blocks[0])
            self.layer2 = self._conv_level(CHANNELS[1], blocks[1], stride=2)
        self.layer3 = self._residual_level(block, CHANNELS[2], blocks[2], stride=2)
        self.layer4 = self._residual_level(block, CHANNELS[3], blocks[3], stride=2)
        self.layer5 = self._residual_level(block, CHANNELS[4], blocks[4], dilation=2, new_level=False)
        self.layer6 = self._residual_level(block, CHANNELS[5], blocks[5], dilation=4, new_level=False)
        if arch == "C":
            self.layer7 = self._residual_level(BasicBlock, CHANNELS[6], blocks[6], dilation=2, new_level=False,
                                               residual=False)
            self.layer8 = self._residual_level(BasicBlock, CHANNELS[7], blocks[7], dilation=1, new_level=False,
                                               residual=False)
        else:
            self.layer7 = self._conv_level(CHANNELS[6], blocks[6], dilation=2)
            self.layer8 = self._conv_level(CHANNELS[7], blocks[7], dilation=1)
        # DRN-C's de-gridding blocks drop the residual; the release still holds their shortcut
        # projections (kept for key compatibility), which never receive a gradient.
        for module in self.modules():
            if getattr(module, "residual", True) is False and getattr(module, "downsample", None) is not None:
                module.downsample.requires_grad_(False)
        expand = block.expansion
        self.channels = [CHANNELS[1], CHANNELS[2] * expand, CHANNELS[3] * expand, CHANNELS[7]]
        self.strides = [2, 4, 8, 8]
        self.weights_origin = weights_origin(weights, pretrained, torch_hub_file(WEIGHT_URLS[name]).name)
        if weights:
            load_backbone_weights(self, weights)
        elif pretrained:
            self.load_state_dict(load_url_weights(WEIGHT_URLS[name], name), strict=True)

    def _residual_level(self, block: type[nn.Module], planes: int, count: int, stride: int = 1, dilation: int = 1,
                        new_level: bool = True, residual: bool = True) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self._in, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        # Entering a new dilation level, the first conv uses half the dilation to avoid gridding.
        first = (1, 1) if dilation == 1 else (dilation // 2 if new_level else dilation, dilation)
        layers = [block(self._in, planes, stride, downsample, dilation=first, residual=residual)]
        self._in = out_ch
        layers += [block(out_ch, planes, dilation=(dilation, dilation), residual=residual) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def _conv_level(self, channels: int, count: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(count):
            layers += [
                nn.Conv2d(self._in, channels, 3, stride if i == 0 else 1, padding=dilation, dilation=dilation,
                          bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            self._in = channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x))) if self.arch == "C" else self.layer0(x)
        x = self.layer2(self.layer1(x))
        features = [x]
        x = self.layer3(x)
        features.append(x)
        x = self.layer4(x)
        features.append(x)
        x = self.layer8(self.layer7(self.layer6(self.layer5(x))))
        features.append(x)
        return features
