"""Augmentation (albumentations) for training and the plain normalisation used for evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance

from segtrain.config import AugmentConfig
from segtrain.data.normalization import normalise_image
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


class DiscreteRandomScale(A.RandomScale):
    """RandomScale restricted to a fixed set of factors (DeepLab's scale_factor_step_size)."""

    def __init__(self, scales: Sequence[float], **kwargs: object) -> None:
        super().__init__(scale_limit=(min(scales) - 1.0, max(scales) - 1.0), **kwargs)
        self.scales = tuple(float(s) for s in scales)

    def get_params(self) -> dict[str, float]:
        return {"scale": self.py_random.choice(self.scales)}


class EnhanceJitter(A.ImageOnlyTransform):
    """DLA's RandomJitter: PIL ImageEnhance brightness, contrast and sharpness, each by a factor uniform
    in [1 - strength, 1 + strength], applied in a random order (ucbdrive/dla data_transforms.py)."""

    ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Sharpness)

    def __init__(self, strength: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.strength = float(strength)

    def get_params(self) -> dict[str, list]:
        order = list(range(len(self.ENHANCERS)))
        self.py_random.shuffle(order)
        factors = [1.0 + self.py_random.uniform(-self.strength, self.strength) for _ in order]
        return {"order": order, "factors": factors}

    def apply(self, img: np.ndarray, order: list[int], factors: list[float], **params: object) -> np.ndarray:
        picture = Image.fromarray(img)
        for index, factor in zip(order, factors):
            picture = self.ENHANCERS[index](picture).enhance(factor)
        return np.asarray(picture)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength",)


class Blur5x5(A.ImageOnlyTransform):
    """hszhao/semseg's RandomGaussianBlur: cv2.GaussianBlur(image, (5, 5), 0), i.e. OpenCV's fixed 5-tap
    kernel [1, 4, 6, 4, 1] / 16 for a zero sigma (not a Gaussian of sigma 1.1, which albumentations'
    GaussianBlur would compute)."""

    def apply(self, img: np.ndarray, **params: object) -> np.ndarray:
        return cv2.GaussianBlur(img, (5, 5), 0)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


def flip_permutation(flip_pairs: Sequence[Sequence[int]], num_classes: int = 256) -> list[int]:
    """Class index -> its index in the mirrored image: identity except for the swapped pairs (dataset.flip_pairs)."""
    permutation = list(range(num_classes))
    for left, right in flip_pairs:
        permutation[int(left)], permutation[int(right)] = int(right), int(left)
    return permutation


class LabelSwappingHorizontalFlip(A.HorizontalFlip):
    """A horizontal flip that also relabels the mask through `flip_pairs` (LIP: a left arm seen in the mirror is
    a right arm), as HRNet-Semantic-Segmentation's LIP dataset does; the image is flipped as by HorizontalFlip."""

    def __init__(self, flip_pairs: Sequence[Sequence[int]], p: float = 0.5) -> None:
        super().__init__(p=p)
        self.flip_pairs = [tuple(int(v) for v in pair) for pair in flip_pairs]
        self.table = np.array(flip_permutation(self.flip_pairs), dtype=np.uint8)

    def apply_to_mask(self, mask: np.ndarray, **params: object) -> np.ndarray:
        flipped = np.ascontiguousarray(mask[:, ::-1])
        return self.table[flipped] if flipped.dtype == np.uint8 else np.take(self.table, flipped).astype(mask.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("flip_pairs",)


def discrete_scales(low: float, high: float, step: float) -> list[float]:
    """low, low + step, ..., high, as DeepLab's get_random_scale spaces them (linspace over the steps)."""
    if step <= 0:
        raise ConfigError(f"dataset.augment.scale_step must be > 0 (or null), got {step}")
    count = int((high - low) / step + 1)
    return [float(v) for v in np.linspace(low, high, max(count, 1))]


def _probability(key: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"dataset.augment.{key} is a probability, between 0 and 1; got {value}")
    return float(value)


def _scale_step(augment: AugmentConfig) -> A.BasicTransform:
    low, high = (float(v) for v in augment.scale_range)
    if not 0 < low <= high:
        raise ConfigError(f"dataset.augment.scale_range must be [low, high] with 0 < low <= high, got {low, high}")
    interpolation = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST, "p": 1.0}
    if augment.scale_step is not None:
        return DiscreteRandomScale(discrete_scales(low, high, float(augment.scale_step)), **interpolation)
    return A.RandomScale(scale_limit=(low - 1.0, high - 1.0), **interpolation)


def _geometric_steps(augment: AugmentConfig, fill: tuple[float, ...], ignore_index: int) -> list[A.BasicTransform]:
    """Scale -> rotate -> blur, in hszhao/semseg's order (the blur sees the rotated image, not the pad)."""
    steps = [_scale_step(augment)]
    if augment.rotate:
        if not 0 < float(augment.rotate) <= 180:
            raise ConfigError(f"dataset.augment.rotate is the largest angle in degrees (0 < rotate <= 180, or 0 "
                              f"for none), got {augment.rotate}")
        steps.append(A.Rotate(limit=(-float(augment.rotate), float(augment.rotate)), interpolation=cv2.INTER_LINEAR,
                              mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=fill,
                              fill_mask=ignore_index, p=_probability("rotate_prob", augment.rotate_prob)))
    if _probability("gaussian_blur", augment.gaussian_blur) > 0:
        steps.append(Blur5x5(p=augment.gaussian_blur))
    return steps


def _photometric_steps(augment: AugmentConfig) -> list[A.BasicTransform]:
    steps: list[A.BasicTransform] = []
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    if augment.enhance_jitter:
        if not 0 < float(augment.enhance_jitter) < 1:
            raise ConfigError(f"dataset.augment.enhance_jitter must be in (0, 1) (or 0 for none), got "
                              f"{augment.enhance_jitter}")
        steps.append(EnhanceJitter(float(augment.enhance_jitter)))
    return steps


def train_transform(
    augment: AugmentConfig, mean: Sequence[float], std: Sequence[float], ignore_index: int = 255,
    flip_pairs: Sequence[Sequence[int]] = (),
) -> SeededTransform:
    """Random scale -> rotate -> blur -> pad to the crop (image: mean or 0, mask: ignore) -> random crop
    -> flip (swapping the labels of `flip_pairs`) -> colour jitter -> normalise; the optional steps only where
    dataset.augment enables them."""
    crop_h, crop_w = (int(v) for v in augment.crop_size)
    if augment.pad_image_with not in ("mean", "zero"):
        raise ConfigError(f"dataset.augment.pad_image_with must be 'mean' or 'zero', got {augment.pad_image_with!r}")
    fill = tuple(255.0 * m for m in mean) if augment.pad_image_with == "mean" else (0.0, 0.0, 0.0)
    steps = _geometric_steps(augment, fill, ignore_index)
    steps += [
        A.PadIfNeeded(min_height=crop_h, min_width=crop_w, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index),
        A.RandomCrop(height=crop_h, width=crop_w),
    ]
    if augment.hflip:
        steps.append(LabelSwappingHorizontalFlip(flip_pairs, p=0.5) if flip_pairs else A.HorizontalFlip(p=0.5))
    steps += _photometric_steps(augment)
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return SeededTransform(A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST))


class EvalTransform:
    """Normalisation only (segtrain.data.normalization.normalise_image, as predict's): validation images
    keep their full original size, never cropped."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalise_image(image, self.mean, self.std), torch.from_numpy(np.ascontiguousarray(mask)).long()


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """Normalisation only: validation images keep their full original size, never cropped."""
    return EvalTransform(mean, std)
