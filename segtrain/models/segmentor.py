"""Backbone + head: the common shape of every segmentation model in segtrain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.base import Backbone
from segtrain.models.resize import resize_to


def check_dropout(dropout: float, key: str = "model.dropout") -> None:
    """torch's Dropout would refuse it with a ValueError from inside the head; name the key instead."""
    if not 0.0 <= dropout <= 1.0:
        raise ConfigError(f"{key} is a probability, between 0 and 1; got {dropout}")


class Segmentor(nn.Module):
    """Runs `backbone` then `decode(features)`; returns {"out": logits at the input size}, plus the
    keys of `auxiliary_outputs()` in training mode.

    The input is zero-padded at the bottom/right to the backbone's size divisor and the logits are
    cropped back, so any input size (513x513 included) gives logits of exactly that size. Logits are
    returned in float32 so the loss is computed in full precision under autocast.

    `align_corners` is the convention of that final bilinear resize (a model whose official code
    resizes with corners aligned sets it, and uses it for its own resizes too).
    """

    def __init__(self, backbone: Backbone, num_classes: int, align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        if not isinstance(align_corners, bool):
            raise ConfigError(f"model.align_corners must be true or false, got {align_corners!r}")
        self.align_corners = align_corners

    def decode(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def auxiliary_outputs(self) -> tuple[str, ...]:
        """The output keys besides "out" that the model returns in training mode (auxiliary heads).

        The loss weights them (`loss.aux_weight`), and DDP's unused-parameter setting comes from them:
        a declared head whose loss weight is 0 gets no gradient. In evaluation only "out" is returned.
        """
        return ()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        div = self.backbone.size_divisor
        pad_h, pad_w = (-height) % div, (-width) % div
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        outputs = self.decode(self.backbone(x))
        padded = (height + pad_h, width + pad_w)
        result = {}
        for key, logits in outputs.items():
            logits = resize_to(logits, padded, self.align_corners)[..., :height, :width]
            result[key] = logits.float()
        return result

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in own]
