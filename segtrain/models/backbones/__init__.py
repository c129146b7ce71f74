"""Backbones: feature extractors returning a list of maps with declared `channels` and `strides`."""

from segtrain.models.backbones.base import Backbone

__all__ = ["Backbone"]
