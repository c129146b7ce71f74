"""Test-time protocols: whole image or sliding window, multi-scale and flip averaging.

One function, `infer`, is used by validation, `segtrain eval` and `segtrain predict`.
- whole: the image through the network (the model pads to what its backbone needs, crops back).
- slide: windows of `crop_size` every `stride` pixels; overlapping windows averaged as logits
  (`average: logits`) or softmax probabilities (`average: probs`, hszhao/semseg's scale_process); an
  image smaller than a window is padded at the bottom/right (`pad: end`) or on both sides (`pad: centred`,
  semseg's), with zeros, i.e. the mean pixel after normalisation.
- scales / flip: the image resized by each scale (and mirrored), softmax probabilities averaged at
  the original resolution, one pass at a time so memory does not grow with the number of passes.
  `flip: per_window` mirrors each window instead of the whole image (semseg's net_process), and
  `resize_long_side: L` scales the image to a long side of round(scale * L) (semseg's base_size).
A single scale of 1.0 without flip returns the plain logits: bit-identical to `whole` inference
(probabilities with `average: probs`: the same argmax).
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
    # The option keys' values are checked by segtrain.config_checks.
    flip_per_window: bool = False  # with flip: mirror each window (slide mode) instead of the whole image
    average: str = "logits"  # how slide windows combine: logits or probs (softmax probabilities)
    pad: str = "end"  # where an image smaller than the window is padded: end (bottom/right) or centred
    resize_long_side: int | None = None  # scale s resizes the image to a long side of round(s * this)

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
        flip = eval_cfg.flip
        long_side = eval_cfg.get("resize_long_side")
        return cls(str(eval_cfg.mode), crop, stride, tuple(float(s) for s in eval_cfg.scales),
                   flip not in (False, None), pairs, flip == "per_window", str(eval_cfg.get("average") or "logits"),
                   str(eval_cfg.get("pad") or "end"),
                   int(long_side) if long_side else None)

    @property
    def plain(self) -> bool:
        return self.scales == (1.0,) and not self.flip and self.resize_long_side is None


def _pair(value: Sequence[int] | int) -> tuple[int, int]:
    values = [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]
    return values[0], values[1]


def _window_starts(length: int, window: int, step: int) -> list[int]:
    starts = list(range(0, max(length - window, 0) + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _window_scores(model: nn.Module, window: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """One window's logits, or its softmax probabilities (`average: probs`), averaged with those of its
    mirror image under `flip: per_window`."""
    mirrored = settings.flip and settings.flip_per_window
    batch = torch.cat([window, window.flip(-1)]) if mirrored else window
    scores = model(batch)["out"]
    if settings.average == "probs":
        scores = scores.float().softmax(dim=1)
    if mirrored:
        count = window.shape[0]
        scores = (scores[:count] + scores[count:].flip(-1)) / 2
    return scores


def slide_logits(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
                 settings: InferenceSettings | None = None) -> torch.Tensor:
    """Scores of overlapping windows averaged (logits, or probabilities with `average: probs`); inputs
    smaller than a window are padded (bottom/right, or centred with `pad: centred`) and cropped back."""
    settings = settings or InferenceSettings("slide", crop, stride)
    height, width = image.shape[-2:]
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    top_pad, left_pad = (pad_h // 2, pad_w // 2) if settings.pad == "centred" else (0, 0)
    if pad_h or pad_w:
        image = F.pad(image, (left_pad, pad_w - left_pad, top_pad, pad_h - top_pad))
    full_h, full_w = image.shape[-2:]
    total = counts = None
    for top in _window_starts(full_h, crop[0], stride[0]):
        for left in _window_starts(full_w, crop[1], stride[1]):
            scores = _window_scores(model, image[..., top:top + crop[0], left:left + crop[1]], settings)
            if total is None:
                total = scores.new_zeros(scores.shape[0], scores.shape[1], full_h, full_w)
                counts = scores.new_zeros(1, 1, full_h, full_w)
            total[..., top:top + crop[0], left:left + crop[1]] += scores
            counts[..., top:top + crop[0], left:left + crop[1]] += 1
    return (total / counts)[..., top_pad:top_pad + height, left_pad:left_pad + width]


def _single_pass(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    if settings.mode == "slide":
        return slide_logits(model, image, settings.crop_size, settings.stride, settings)
    return model(image)["out"]


def _swap_channels(scores: torch.Tensor, flip_pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The mirrored image's scores for class `left` are the original image's for `right`, and back."""
    if not flip_pairs:
        return scores
    order = list(range(scores.shape[1]))
    for left, right in flip_pairs:
        order[left], order[right] = right, left
    return scores[:, order]


def _scaled_size(height: int, width: int, scale: float, long_side: int | None) -> tuple[int, int]:
    """The image size at `scale`: of the image itself, or of a long side of round(scale * long_side) with
    the aspect ratio kept (semseg's test.py: the short side rounded from the long one)."""
    if long_side is None:
        return max(1, round(height * scale)), max(1, round(width * scale))
    long = round(scale * long_side)
    if height > width:
        return long, max(1, round(long / height * width))
    return max(1, round(long / width * height)), long


@torch.no_grad()
def infer(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """(N, C, H, W) scores at the input resolution: logits when `settings.plain` (probabilities with
    `average: probs`), else the mean of softmax probabilities over scales x flips. argmax over C gives
    the prediction either way."""
    if settings.plain:
        return _single_pass(model, image, settings)
    height, width = image.shape[-2:]
    # A slide pass under `average: probs` returns probabilities already; per-window flips happen inside it.
    passes_return_probs = settings.mode == "slide" and settings.average == "probs"
    whole_flip = settings.flip and not (settings.flip_per_window and settings.mode == "slide")
    total = None
    for scale in settings.scales:
        size = _scaled_size(height, width, scale, settings.resize_long_side)
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                   align_corners=False)
        for mirrored in (False, True) if whole_flip else (False,):
            scores = _single_pass(model, scaled.flip(-1) if mirrored else scaled, settings)
            if mirrored:
                scores = _swap_channels(scores, settings.flip_pairs).flip(-1)
            if scores.shape[-2:] != (height, width):
                scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
            probs = scores.float() if passes_return_probs else scores.float().softmax(dim=1)
            total = probs if total is None else total.add_(probs)
    return total / (len(settings.scales) * (2 if whole_flip else 1))
