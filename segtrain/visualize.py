"""Colour at the edges only: palettes, colour masks and side-by-side panels for TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_COLOR = (224, 224, 192)  # VOC's colour for the void / border label


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: class bits spread over the high bits of R, G and B."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def make_palette(colors: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    """A 256x3 palette: the given class colours (or VOC's), IGNORE_COLOR at index 255."""
    palette = voc_palette(256)
    if colors is not None:
        colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        if len(colors) < num_classes:
            raise ValueError(f"palette has {len(colors)} colours for {num_classes} classes")
        palette[: len(colors)] = colors
    palette[255] = IGNORE_COLOR
    return palette


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[mask.astype(np.uint8)]


def panel(image: np.ndarray, target: np.ndarray, prediction: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Input | ground truth | prediction, side by side, HxWx3 uint8."""
    return np.concatenate([image, colorize(target, palette), colorize(prediction, palette)], axis=1)


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """CHW normalised float -> HWC uint8 RGB."""
    hwc = image.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(hwc * 255.0 + 0.5, 0, 255).astype(np.uint8)
