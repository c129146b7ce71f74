"""Models: a backbone (list of feature maps) plus a head, built from the `model` and `backbone` nodes."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain.config import NORMALIZATION_KEYS
from segtrain.errors import ConfigError
from segtrain.instantiate import instantiate_checked

# Keys of the `model` node that segtrain applies to the built model rather than passing to its class.
MODEL_WIDE_KEYS = ("bn_momentum",)


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set the running-statistics momentum of every BatchNorm in `model` (PyTorch convention:
    running = (1 - momentum) * running + momentum * batch); returns how many were set."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def _bn_momentum(model_cfg: DictConfig | dict) -> float | None:
    value = model_cfg.get("bn_momentum")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"model.bn_momentum={value!r}: the BatchNorm momentum is a number in (0, 1] "
                          "(PyTorch's default 0.1; 0.01 in HRNet's official code), or null for PyTorch's default")
    return float(value)


def build_backbone(backbone_cfg: DictConfig) -> nn.Module:
    # backbone.mean/std describe the weights' input statistics for the data pipeline, not the network.
    return instantiate_checked("backbone", backbone_cfg, drop=NORMALIZATION_KEYS)


def build_model(model_cfg: DictConfig, backbone_cfg: DictConfig, num_classes: int) -> nn.Module:
    """Backbone, then model; `model.bn_momentum` (null: PyTorch's 0.1) then applies to every BatchNorm
    of both, as the recipes that set it do (HRNet's official code: 0.01 everywhere)."""
    momentum = _bn_momentum(model_cfg)
    backbone = build_backbone(backbone_cfg)
    model = instantiate_checked("model", model_cfg, drop=MODEL_WIDE_KEYS, backbone=backbone,
                                num_classes=num_classes)
    if momentum is not None:
        set_bn_momentum(model, momentum)
    return model


def backbone_for_inference(backbone_cfg: DictConfig, output_stride: int | None) -> DictConfig:
    """The backbone node for a network that receives trained weights: no pretrained download, and at
    `output_stride` where given (dilation changes no weight shape; the ASPP rates follow the stride)."""
    if output_stride is not None:
        if backbone_cfg.get("output_stride") is None:
            raise ConfigError(f"eval.output_stride: backbone '{backbone_cfg.get('name')}' has no output_stride to "
                              "change (only dilated ResNet / Xception backbones do)")
        backbone_cfg = OmegaConf.merge(backbone_cfg, {"output_stride": int(output_stride)})
    return OmegaConf.merge(backbone_cfg, {"pretrained": False, "weights": None})
