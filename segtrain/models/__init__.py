"""Models: a backbone (list of feature maps) plus a head, built from the `model` and `backbone` nodes."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from segtrain.data.normalization import NORMALIZATION_KEYS
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


def build_model(model_cfg: DictConfig, backbone_cfg: DictConfig, num_classes: int) -> nn.Module:
    """Backbone, then model; `model.bn_momentum` (null: PyTorch's 0.1) then applies to every BatchNorm
    of both, as the recipes that set it do (HRNet's official code: 0.01 everywhere)."""
    momentum = _bn_momentum(model_cfg)
    # backbone.mean/std describe the weights' input statistics for the data pipeline, not the network.
    backbone = instantiate_checked("backbone", backbone_cfg, drop=NORMALIZATION_KEYS)
    model = instantiate_checked("model", model_cfg, drop=MODEL_WIDE_KEYS, backbone=backbone,
                                num_classes=num_classes)
    if momentum is not None:
        set_bn_momentum(model, momentum)
    return model
