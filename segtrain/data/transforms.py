"""Augmentation (albumentations) for training; evaluation images as read.

Both hand over compact tensors: the image as uint8 CHW RGB and the mask in the smallest integer type
that holds its labels (`mask_dtype`: uint8, or int16 for more than 255 labels plus ignore). The float
conversion and the normalisation happen on the device (segtrain.data.normalization.normalize_images,
called by the training step and the evaluation loop), a quarter of the bytes of float32 and an eighth
of an int64 mask to hand from the worker to the training process.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance

from segtrain.config import AugmentConfig
from segtrain.errors import ConfigError


def mask_dtype(num_classes: int | None, ignore_index: int = 255) -> torch.dtype:
    """The smallest type for a dataset's labels: uint8 up to 255 (classes and ignore index), else int16."""
    largest = max(ignore_index, (num_classes or 0) - 1)
    if largest <= 255 and ignore_index >= 0:
        return torch.uint8
    if -32768 <= ignore_index and largest <= 32767:
        return torch.int16
    return torch.int64


class SeededTransform:
    """Applies an albumentations pipeline with a per-call seed; a uint8 CHW image and a compact mask."""

    def __init__(self, pipeline: A.Compose, masks_as: torch.dtype = torch.uint8) -> None:
        self.pipeline, self.masks_as = pipeline, masks_as

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=image, mask=mask)
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"])).to(self.masks_as)
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


class ResampledRandomScale(A.DualTransform):
    """DRN/DLA's RandomScale (fyu/drn, ucbdrive/dla data_transforms.py): a ratio uniform in [low, high], the
    image resized to int(ratio * side) with PIL's antialiasing (Lanczos) filter when shrinking and bicubic
    when enlarging, the mask with nearest neighbour."""

    def __init__(self, low: float, high: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.low, self.high = float(low), float(high)

    def get_params(self) -> dict[str, float]:
        return {"ratio": self.py_random.uniform(self.low, self.high)}

    @staticmethod
    def _size(shape: tuple[int, ...], ratio: float) -> tuple[int, int]:
        return max(1, int(ratio * shape[1])), max(1, int(ratio * shape[0]))  # PIL order: width, height

    def apply(self, img: np.ndarray, ratio: float = 1.0, **params: object) -> np.ndarray:
        if ratio == 1:
            return img
        resample = Image.LANCZOS if ratio < 1 else Image.BICUBIC
        return np.asarray(Image.fromarray(img).resize(self._size(img.shape, ratio), resample))

    def apply_to_mask(self, mask: np.ndarray, ratio: float = 1.0, **params: object) -> np.ndarray:
        if ratio == 1:
            return mask
        return cv2.resize(mask, self._size(mask.shape, ratio), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("low", "high")


class RandomRotation(A.DualTransform):
    """Rotation about the image centre by an angle in [-limit, limit] degrees (uniform, or a whole number of
    degrees as DRN/DLA's randint(0, 2 * limit) - limit): image bilinear, mask nearest; uncovered image pixels
    get `fill` or, with `reflect`, the image's reflection (BORDER_REFLECT_101, as DRN/DLA pad the image by
    reflection before rotating); uncovered mask pixels get `fill_mask`."""

    def __init__(self, limit: float, integer: bool, reflect: bool, fill: tuple[float, ...], fill_mask: int,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self.limit, self.integer, self.reflect = float(limit), bool(integer), bool(reflect)
        self.fill, self.fill_mask = tuple(fill), int(fill_mask)

    def get_params(self) -> dict[str, float]:
        if self.integer:
            whole = int(self.limit)
            return {"angle": float(self.py_random.randint(0, 2 * whole) - whole)}
        return {"angle": self.py_random.uniform(-self.limit, self.limit)}

    @staticmethod
    def _matrix(shape: tuple[int, ...], angle: float) -> np.ndarray:
        return cv2.getRotationMatrix2D(((shape[1] - 1) / 2, (shape[0] - 1) / 2), angle, 1.0)

    def apply(self, img: np.ndarray, angle: float = 0.0, **params: object) -> np.ndarray:
        border = cv2.BORDER_REFLECT_101 if self.reflect else cv2.BORDER_CONSTANT
        return cv2.warpAffine(img, self._matrix(img.shape, angle), (img.shape[1], img.shape[0]),
                              flags=cv2.INTER_LINEAR, borderMode=border, borderValue=self.fill)

    def apply_to_mask(self, mask: np.ndarray, angle: float = 0.0, **params: object) -> np.ndarray:
        return cv2.warpAffine(mask, self._matrix(mask.shape, angle), (mask.shape[1], mask.shape[0]),
                              flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("limit", "integer", "reflect", "fill", "fill_mask")


class ReflectPadToSize(A.DualTransform):
    """DLA's RandomCrop padding (ucbdrive/dla data_transforms.py): an image smaller than the crop padded
    centred by reflection without the edge repeated (pad_reflection, OpenCV's BORDER_REFLECT_101), the mask
    with `fill_mask`."""

    def __init__(self, height: int, width: int, fill_mask: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width, self.fill_mask = int(height), int(width), int(fill_mask)

    def _borders(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        pad_h, pad_w = max(self.height - shape[0], 0), max(self.width - shape[1], 0)
        return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2

    def apply(self, img: np.ndarray, **params: object) -> np.ndarray:
        return cv2.copyMakeBorder(img, *self._borders(img.shape), cv2.BORDER_REFLECT_101)

    def apply_to_mask(self, mask: np.ndarray, **params: object) -> np.ndarray:
        return cv2.copyMakeBorder(mask, *self._borders(mask.shape), cv2.BORDER_CONSTANT, value=self.fill_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "fill_mask")


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
    if augment.scale_resample not in ("bilinear", "antialias_bicubic"):
        raise ConfigError(f"dataset.augment.scale_resample must be bilinear or antialias_bicubic, got "
                          f"{augment.scale_resample!r}")
    if augment.scale_resample == "antialias_bicubic":
        if augment.scale_step is not None:
            raise ConfigError("dataset.augment.scale_resample=antialias_bicubic draws scales uniformly (DRN/DLA's "
                              "RandomScale); set dataset.augment.scale_step=null")
        return ResampledRandomScale(low, high)
    interpolation = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST, "p": 1.0}
    if augment.scale_step is not None:
        return DiscreteRandomScale(discrete_scales(low, high, float(augment.scale_step)), **interpolation)
    return A.RandomScale(scale_limit=(low - 1.0, high - 1.0), **interpolation)


def _rotate_step(augment: AugmentConfig, fill: tuple[float, ...], ignore_index: int) -> A.BasicTransform:
    if not 0 < float(augment.rotate) <= 180:
        raise ConfigError(f"dataset.augment.rotate is the largest angle in degrees (0 < rotate <= 180, or 0 "
                          f"for none), got {augment.rotate}")
    probability = _probability("rotate_prob", augment.rotate_prob)
    if augment.rotate_integer or augment.image_border == "reflect":
        if augment.rotate_integer and float(augment.rotate) != int(augment.rotate):
            raise ConfigError(f"dataset.augment.rotate_integer draws whole degrees: rotate must be a whole number, "
                              f"got {augment.rotate}")
        return RandomRotation(float(augment.rotate), bool(augment.rotate_integer), augment.image_border == "reflect",
                              fill, ignore_index, p=probability)
    return A.Rotate(limit=(-float(augment.rotate), float(augment.rotate)), interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=fill,
                    fill_mask=ignore_index, p=probability)


def _geometric_steps(augment: AugmentConfig, fill: tuple[float, ...], ignore_index: int) -> list[A.BasicTransform]:
    """Scale -> rotate -> blur, in hszhao/semseg's order (the blur sees the rotated image, not the pad);
    rotate -> scale with `rotate_before_scale` (DRN/DLA segment.py)."""
    steps = [_scale_step(augment)]
    if augment.rotate:
        rotation = _rotate_step(augment, fill, ignore_index)
        steps = [rotation, *steps] if augment.rotate_before_scale else [*steps, rotation]
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
    augment: AugmentConfig, mean: Sequence[float], std: Sequence[float], ignore_index: int = 255, *,
    flip_pairs: Sequence[Sequence[int]] = (),
    num_classes: int | None = None,
) -> SeededTransform:
    """Random scale -> rotate -> blur -> pad to the crop (image: mean or 0, mask: ignore) -> random crop
    -> flip (swapping the labels of `flip_pairs`) -> colour jitter; the optional steps only where
    dataset.augment enables them. Normalising (with `mean`/`std`) is the device's (module docstring);
    `mean` is the pad colour here."""
    crop_h, crop_w = (int(v) for v in augment.crop_size)
    if augment.pad_image_with not in ("mean", "zero"):
        raise ConfigError(f"dataset.augment.pad_image_with must be 'mean' or 'zero', got {augment.pad_image_with!r}")
    fill = tuple(255.0 * m for m in mean) if augment.pad_image_with == "mean" else (0.0, 0.0, 0.0)
    if augment.image_border not in ("constant", "reflect"):
        raise ConfigError(f"dataset.augment.image_border must be constant or reflect, got {augment.image_border!r}")
    steps = _geometric_steps(augment, fill, ignore_index)
    if augment.image_border == "reflect":
        # DLA's RandomCrop: the image padded centred by reflection, the mask with ignore_index.
        steps.append(ReflectPadToSize(crop_h, crop_w, ignore_index))
    else:
        steps.append(A.PadIfNeeded(min_height=crop_h, min_width=crop_w, position="top_left",
                                   border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index))
    steps.append(A.RandomCrop(height=crop_h, width=crop_w))
    if augment.hflip:
        steps.append(LabelSwappingHorizontalFlip(flip_pairs, p=0.5) if flip_pairs else A.HorizontalFlip(p=0.5))
    steps += _photometric_steps(augment)
    pipeline = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)
    return SeededTransform(pipeline, mask_dtype(num_classes, ignore_index))


def eval_transform(num_classes: int | None = None, ignore_index: int = 255) -> SeededTransform:
    """Validation images as read: full original size, never cropped; normalised on the device."""
    return SeededTransform(A.Compose([]), mask_dtype(num_classes, ignore_index))
