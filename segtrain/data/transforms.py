"""Augmentation (albumentations) for training and the plain normalisation used for evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from segtrain.config import AugmentConfig
from segtrain.errors import ConfigError


class SeededTransform:
    """Applies an albumentations pipeline with a per-call seed and converts to tensors."""

    def __init__(self, pipeline: A.Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=image, mask=mask)
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"])).long()
        return image_t, mask_t


def train_transform(
    augment: AugmentConfig, mean: Sequence[float], std: Sequence[float], ignore_index: int = 255
) -> SeededTransform:
    """Random scale -> pad to the crop (image: mean or 0, mask: ignore) -> random crop -> flip."""
    crop_h, crop_w = (int(v) for v in augment.crop_size)
    low, high = (float(v) for v in augment.scale_range)
    if not 0 < low <= high:
        raise ConfigError(f"dataset.augment.scale_range must be [low, high] with 0 < low <= high, got {low, high}")
    if augment.pad_image_with not in ("mean", "zero"):
        raise ConfigError(f"dataset.augment.pad_image_with must be 'mean' or 'zero', got {augment.pad_image_with!r}")
    fill = tuple(255.0 * m for m in mean) if augment.pad_image_with == "mean" else (0.0, 0.0, 0.0)
    steps = [
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_h, min_width=crop_w, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index),
        A.RandomCrop(height=crop_h, width=crop_w),
    ]
    if augment.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return SeededTransform(A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST))


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> SeededTransform:
    """Normalisation only: validation images keep their full original size, never cropped."""
    return SeededTransform(A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0)]))
