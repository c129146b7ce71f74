"""DeepLab v3 (Chen et al., arXiv 2017) and v3+ (Chen et al., ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.heads.aspp import ASPP, scaled_rates
from segtrain.models.heads.blocks import conv3x3_bn_relu, conv_bn_relu
from segtrain.models.resize import resize_to
from segtrain.models.segmentor import Segmentor, check_dropout


def paper_uses_separable(backbone_name: str) -> bool:
    """The DeepLab v3+ paper's choice per backbone family: depthwise-separable ASPP and decoder convs with
    Xception, plain convolutions with ResNet (and, by the same rule, every other family)."""
    return "xception" in backbone_name.split(".")[0].lower()


def resolve_separable(separable: bool | str, backbone_name: str) -> bool:
    """`model.separable`: true, false, or "auto" (the paper's choice for the backbone's family)."""
    if isinstance(separable, bool):
        return separable
    if separable == "auto":
        return paper_uses_separable(backbone_name)
    raise ConfigError(f"model.separable must be true, false or auto (separable with Xception, plain otherwise, "
                      f"as in the DeepLab v3+ paper); got {separable!r}")


# Where DeepLab v3+ takes its stride-4 feature: as the backbone returns it, or before the block's ReLU.
DECODER_TAPS = ("post_act", "pre_act")


class DeepLabV3(Segmentor):
    """ASPP (with image pooling) on the deepest feature, then a 1x1 classifier; no decoder.

    `separable` (true, false or "auto"): depthwise-separable 3x3 convs; "auto" resolves from the
    backbone's name (see `paper_uses_separable`) and the resolved value is `self.separable`.
    `align_corners`: the convention of every bilinear resize (TensorFlow DeepLab's resize_bilinear calls
    use align_corners=True; PyTorch's default is False).
    """

    def __init__(self, backbone: Backbone, num_classes: int, aspp_channels: int = 256,
                 aspp_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1, separable: bool | str = "auto",
                 align_corners: bool = False) -> None:
        super().__init__(backbone, num_classes, align_corners)
        check_dropout(dropout)
        self.separable = resolve_separable(separable, getattr(backbone, "name", ""))
        rates = scaled_rates(list(aspp_rates), backbone.strides[-1])
        self.aspp = ASPP(backbone.channels[-1], aspp_channels, rates, dropout, self.separable)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"out": self.classifier(self.aspp(features[-1]))}


class DeepLabV3Plus(DeepLabV3):
    """DeepLab v3 encoder + decoder fusing the ASPP output with the stride-4 feature.

    With separable convs (the paper's Xception-65 setting, what "auto" gives for Xception) the ASPP's
    3x3 branches and the decoder's two 3x3 convolutions are depthwise-separable, each part followed
    by BN and ReLU; the paper's ResNet-101 rows use plain convolutions ("auto" for ResNets).
    `decoder_tap`: "post_act" decodes the stride-4 feature as the backbone returns it; "pre_act" takes it
    before the block's ReLU, where TensorFlow DeepLab taps Xception-65 (see
    `TimmBackbone.tap_before_activation`; aligned Xception backbones only).
    """

    def __init__(self, backbone: Backbone, num_classes: int, aspp_channels: int = 256,
                 aspp_rates: Sequence[int] = (6, 12, 18), decoder_channels: int = 256, low_level_channels: int = 48,
                 dropout: float = 0.1, separable: bool | str = "auto", align_corners: bool = False,
                 decoder_tap: str = "post_act") -> None:
        super().__init__(backbone, num_classes, aspp_channels, aspp_rates, dropout, separable, align_corners)
        if 4 not in backbone.strides:
            raise ConfigError(
                f"backbone: DeepLab v3+ decodes with a stride-4 feature, but this backbone's features have strides "
                f"{backbone.strides}; use a backbone with a stride-4 level (resnet18/34/50/101, xception65, "
                "hrnet_w*, dla*, drn_*; for backbone=timm include it in backbone.out_indices) or model=deeplabv3"
            )
        self.low_level_index = backbone.strides.index(4)
        if decoder_tap not in DECODER_TAPS:
            raise ConfigError(f"model.decoder_tap must be one of {', '.join(DECODER_TAPS)}, got {decoder_tap!r}")
        if decoder_tap == "pre_act":
            tap = getattr(backbone, "tap_before_activation", None)
            if tap is None:
                raise ConfigError(f"model.decoder_tap=pre_act: backbone {backbone.name!r} offers no pre-activation "
                                  "tap (aligned Xception does); use model.decoder_tap=post_act")
            tap(self.low_level_index)
        self.decoder_tap = decoder_tap
        self.low_level = conv_bn_relu(backbone.channels[self.low_level_index], low_level_channels)
        self.fuse = nn.Sequential(
            conv3x3_bn_relu(aspp_channels + low_level_channels, decoder_channels, separable=self.separable),
            conv3x3_bn_relu(decoder_channels, decoder_channels, separable=self.separable),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        low = self.low_level(features[self.low_level_index])
        high = resize_to(self.aspp(features[-1]), low.shape[-2:], self.align_corners)
        return {"out": self.classifier(self.fuse(torch.cat([high, low], dim=1)))}
