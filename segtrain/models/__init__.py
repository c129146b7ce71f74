"""Models: a backbone (list of feature maps) plus a head, built from the `model` and `backbone` nodes."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from segtrain.instantiate import instantiate_checked


def build_model(model_cfg: DictConfig, backbone_cfg: DictConfig, num_classes: int) -> nn.Module:
    backbone = instantiate_checked("backbone", backbone_cfg)
    return instantiate_checked("model", model_cfg, backbone=backbone, num_classes=num_classes)
