"""Bilinear resizing of feature maps and logits, with PyTorch's `align_corners=False` convention by default.

Every model resizes through `resize_to`, which is `F.interpolate` on every device and in every
mode (training, inference, ONNX / TorchScript export, torch.compile): a model computes the same
function on CPU and GPU, so what is measured on one holds on the other. `align_corners=True` (corner
pixels of input and output aligned) is there for models whose official code resizes that way
(PSPNet's hszhao/semseg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size, align_corners: bool = False) -> torch.Tensor:
    """Bilinearly resize an NCHW tensor to `size` (height, width); `x` itself when it has that size."""
    size = (size[0], size[1])  # no int(): under export, sizes are symbolic
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
