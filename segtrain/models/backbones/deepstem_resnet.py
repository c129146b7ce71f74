"""The deep-stem dilated ResNet of PSPNet's official code (hszhao/semseg), written for segtrain.

Stem: three 3x3 convolutions (3->64 at stride 2, 64->64, 64->128), each followed by BN and ReLU,
then 3x3 max pooling at stride 2; layer1..layer4 are ResNet v1.5 bottlenecks (stride on the 3x3
conv) entered with 128 channels. At output stride 8 layer3 and layer4 do not stride and *every*
block of layer3 has dilation 2 and every block of layer4 dilation 4, first blocks included (the
official PSPNet sets the dilation of all their 3x3 convs; torchvision's and timm's dilated ResNets
enter each dilated stage at the previous stage's dilation instead).

Module names (conv1/bn1, conv2/bn2, conv3/bn3, layer1..layer4, and conv1..3/bn1..3/downsample inside
blocks) are those of the official ImageNet files `resnet50_v2.pth` / `resnet101_v2.pth` /
`resnet152_v2.pth`, so they load with strict=True (their `fc.` classifier aside).
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone, load_backbone_weights, weights_origin
from segtrain.models.backbones.drn import Bottleneck
from segtrain.models.backbones.weights import manual_weights_file

# name -> bottleneck blocks in layer1..layer4
ARCHS = {
    "resnet50_deepstem": (3, 4, 6, 3),
    "resnet101_deepstem": (3, 4, 23, 3),
    "resnet152_deepstem": (3, 8, 36, 3),
}
# The official ImageNet files: published only in a Google Drive folder (no direct file URL).
OFFICIAL_FILES = {name: name.replace("_deepstem", "_v2.pth") for name in ARCHS}
OFFICIAL_SOURCE = "the Google Drive folder linked from the hszhao/semseg README " \
                  "(https://drive.google.com/open?id=15wx9vOM0euyizq-M1uINgN0_wjVRf9J3)"
# output stride -> (stride, dilation) of layer3 and layer4
DILATION_PLANS = {8: ((1, 2), (1, 4)), 16: ((2, 1), (1, 2)), 32: ((2, 1), (2, 1))}
PLANES = (64, 128, 256, 512)


def conv3x3_bn(in_ch: int, out_ch: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False), nn.BatchNorm2d(out_ch)


class DeepStemResNet(Backbone):
    """forward(x) -> [layer1, layer2, layer3, layer4]: strides 4, 8, 8, 8 at output stride 8."""

    def __init__(self, name: str = "resnet101_deepstem", output_stride: int = 8, pretrained: bool = False,
                 weights: str | None = None) -> None:
        super().__init__()
        if name not in ARCHS:
            raise ConfigError(f"backbone.name={name!r} is not a deep-stem ResNet; choose one of {sorted(ARCHS)}")
        if output_stride not in DILATION_PLANS:
            raise ConfigError(f"backbone.output_stride must be 8, 16 or 32 (8 in the official PSPNet), "
                              f"got {output_stride}")
        self.name = name
        self.conv1, self.bn1 = conv3x3_bn(3, 64, stride=2)
        self.conv2, self.bn2 = conv3x3_bn(64, 64)
        self.conv3, self.bn3 = conv3x3_bn(64, 128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in = 128
        (stride3, dilation3), (stride4, dilation4) = DILATION_PLANS[output_stride]
        blocks = ARCHS[name]
        self.layer1 = self._layer(PLANES[0], blocks[0])
        self.layer2 = self._layer(PLANES[1], blocks[1], stride=2)
        self.layer3 = self._layer(PLANES[2], blocks[2], stride3, dilation3)
        self.layer4 = self._layer(PLANES[3], blocks[3], stride4, dilation4)
        self.channels = [planes * Bottleneck.expansion for planes in PLANES]
        self.strides = [4, 8, 8 * stride3, 8 * stride3 * stride4]
        self._init_weights()
        self.weights_origin = weights_origin(weights, pretrained, OFFICIAL_FILES[name])
        if weights:
            load_backbone_weights(self, weights)
        elif pretrained:
            load_backbone_weights(self, manual_weights_file(OFFICIAL_FILES[name], name, OFFICIAL_SOURCE))

    def _layer(self, planes: int, count: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        out_ch = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self._in, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        layers = [Bottleneck(self._in, planes, stride, downsample, dilation=(dilation, dilation))]
        self._in = out_ch
        layers += [Bottleneck(out_ch, planes, dilation=(dilation, dilation)) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # The official initialisation (used when training without ImageNet weights). Models built on the
        # meta device (segtrain info) have no values to initialise.
        if self.conv1.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features
