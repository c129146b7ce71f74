"""Backbones: feature extractors returning a list of maps with declared `channels` and `strides`."""

from segtrain.models.backbones.base import Backbone
from segtrain.models.backbones.resnet import ResNetBackbone

__all__ = ["Backbone", "ResNetBackbone"]
