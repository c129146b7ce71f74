"""Test-time protocols: whole image or sliding window, multi-scale and flip averaging.

One function, `infer`, is used by validation, `segtrain eval` and `segtrain predict`.
- whole: the image through the network (the model pads to what its backbone needs, crops back).
- slide: windows of `crop_size` every `stride` pixels; logits of overlapping windows averaged.
- scales / flip: the image resized by each scale (and mirrored), softmax probabilities averaged at
  the original resolution, one pass at a time so memory does not grow with the number of passes.
A single scale of 1.0 without flip returns the plain logits: bit-identical to `whole` inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class InferenceSettings:
    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    # Score channels swapped in the mirrored pass before it is mirrored back (dataset.flip_pairs: LIP's left and
    # right arms, legs, shoes), as HRNet-Semantic-Segmentation's LIP flip test does.
    flip_pairs: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_config(cls, eval_cfg, train_crop: Sequence[int] | None = None,
                    flip_pairs: Sequence[Sequence[int]] | None = None) -> InferenceSettings:
        """From the `eval` section (checked by segtrain.config_checks); the window defaults to the training
        crop and the step to 2/3 of the window; `flip_pairs` from dataset.flip_pairs."""
        crop = eval_cfg.crop_size if eval_cfg.crop_size is not None else train_crop
        crop = _pair(crop) if crop is not None else None
        stride = _pair(eval_cfg.stride) if eval_cfg.stride is not None else None
        if crop is not None and stride is None:
            stride = (max(1, math.ceil(crop[0] * 2 / 3)), max(1, math.ceil(crop[1] * 2 / 3)))
        pairs = tuple((int(a), int(b)) for a, b in flip_pairs or ())
        return cls(str(eval_cfg.mode), crop, stride, tuple(float(s) for s in eval_cfg.scales), bool(eval_cfg.flip),
                   pairs)

    @property
    def plain(self) -> bool:
        return self.scales == (1.0,) and not self.flip


def _pair(value: Sequence[int] | int) -> tuple[int, int]:
    values = [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]
    return values[0], values[1]


def _window_starts(length: int, window: int, step: int) -> list[int]:
    starts = list(range(0, max(length - window, 0) + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def slide_logits(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits of overlapping windows averaged; inputs smaller than a window are padded and cropped back."""
    height, width = image.shape[-2:]
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = image.shape[-2:]
    total = counts = None
    for top in _window_starts(full_h, crop[0], stride[0]):
        for left in _window_starts(full_w, crop[1], stride[1]):
            logits = model(image[..., top:top + crop[0], left:left + crop[1]])["out"]
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], full_h, full_w)
                counts = logits.new_zeros(1, 1, full_h, full_w)
            total[..., top:top + crop[0], left:left + crop[1]] += logits
            counts[..., top:top + crop[0], left:left + crop[1]] += 1
    return (total / counts)[..., :height, :width]


def _single_pass(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    if settings.mode == "slide":
        return slide_logits(model, image, settings.crop_size, settings.stride)
    return model(image)["out"]


def _swap_channels(scores: torch.Tensor, flip_pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The mirrored image's scores for class `left` are the original image's for `right`, and back."""
    if not flip_pairs:
        return scores
    order = list(range(scores.shape[1]))
    for left, right in flip_pairs:
        order[left], order[right] = right, left
    return scores[:, order]


@torch.no_grad()
def infer(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """(N, C, H, W) scores at the input resolution: logits when `settings.plain`, else the mean of
    softmax probabilities over scales x flips. argmax over C gives the prediction either way."""
    if settings.plain:
        return _single_pass(model, image, settings)
    height, width = image.shape[-2:]
    total = None
    for scale in settings.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                   align_corners=False)
        for mirrored in (False, True) if settings.flip else (False,):
            logits = _single_pass(model, scaled.flip(-1) if mirrored else scaled, settings)
            if mirrored:
                logits = _swap_channels(logits, settings.flip_pairs).flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.float().softmax(dim=1)
            total = probs if total is None else total.add_(probs)
    return total / (len(settings.scales) * (2 if settings.flip else 1))
