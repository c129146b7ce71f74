"""HRNet (timm) with the fuse layers of the official segmentation code.

timm's HRNet, written for ImageNet classification, brings a coarser branch up to a finer one in its
fuse layers with nearest-neighbour upsampling; the official HRNet-Semantic-Segmentation code (every
branch: master, pytorch-v1.1, HRNet-OCR) uses bilinear interpolation there, with
`align_corners=False` (the default of PyTorch >= 0.4.0 on master; `MODEL.ALIGN_CORNERS: False` in
the Cityscapes configs of HRNet-OCR). Weights are the same either way, so ImageNet and official
segmentation checkpoints load into both; the computed function is not.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.timm_encoder import TimmBackbone

FUSE_UPSAMPLE_MODES = ("bilinear", "nearest")


def set_fuse_upsampling(net: nn.Module, mode: str, align_corners: bool = False) -> int:
    """Give every upsampling of `net`'s HRNet fuse layers `mode` (bilinear with `align_corners`);
    returns how many were changed.

    A fuse layer from branch j to a finer branch i is conv1x1 -> BN -> upsample x2^(j-i). Exact
    2^k factors (inputs padded to the largest stride) make `scale_factor` and the official
    `size=` of the finer branch the same interpolation.
    """
    from timm.models.hrnet import HighResolutionModule

    changed = 0
    for module in net.modules():
        if not isinstance(module, HighResolutionModule):
            continue
        for path in module.fuse_layers:
            for layer in path:
                if not isinstance(layer, nn.Sequential):
                    continue
                for index, part in enumerate(layer):
                    if isinstance(part, nn.Upsample):
                        align = bool(align_corners) if mode == "bilinear" else None
                        layer[index] = nn.Upsample(scale_factor=part.scale_factor, mode=mode, align_corners=align)
                        changed += 1
    return changed


class HRNetBackbone(TimmBackbone):
    """timm's HRNet returning the branch outputs, with `fuse_upsample` ("bilinear", as the official
    segmentation code; "nearest", as timm) in every fuse layer.

    `fuse_align_corners` is the bilinear convention of those fuse layers: the official code takes it
    from MODEL.ALIGN_CORNERS, false in the HRNetV2 Cityscapes configs and left at its default, true,
    in the HRNet + OCR configs.

    The other options are TimmBackbone's; `size_divisor` must be a multiple of the largest stride
    (32), since the fuse layers resample by exact powers of two.
    """

    def __init__(
        self,
        name: str,
        fuse_upsample: str = "bilinear",
        fuse_align_corners: bool = False,
        output_stride: int | None = None,
        out_indices: list[int] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        size_divisor: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if fuse_upsample not in FUSE_UPSAMPLE_MODES:
            raise ConfigError(f"backbone.fuse_upsample={fuse_upsample!r}: choose bilinear (the official HRNet "
                              "segmentation code) or nearest (timm's HRNet)")
        if not isinstance(fuse_align_corners, bool) or (fuse_align_corners and fuse_upsample != "bilinear"):
            raise ConfigError(f"backbone.fuse_align_corners={fuse_align_corners!r}: true or false, and true only "
                              "with backbone.fuse_upsample=bilinear")
        if not str(name).split(".")[0].startswith("hrnet"):
            raise ConfigError(f"backbone.name={name!r}: HRNetBackbone builds timm's hrnet_* models; for other timm "
                              "models use backbone=timm")
        super().__init__(name, output_stride=output_stride, out_indices=out_indices, pretrained=pretrained,
                         weights=weights, size_divisor=size_divisor, model_kwargs=model_kwargs)
        if self.size_divisor % max(self.strides):
            raise ConfigError(f"backbone.size_divisor={self.size_divisor}: HRNet fuses its branches by exact "
                              f"2x resampling, so inputs must be padded to a multiple of {max(self.strides)}")
        if set_fuse_upsampling(self.net, fuse_upsample, fuse_align_corners) == 0:
            raise ConfigError(f"backbone.name={name!r}: found no HRNet fuse layers to set to {fuse_upsample}")
