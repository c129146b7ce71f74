"""Colour at the edges only: palettes, colour masks and side-by-side panels for TensorBoard."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from segtrain.errors import ConfigError

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


def _class_colors(colors: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """`dataset.palette` as an Nx3 uint8 array, or a ConfigError saying what the key must hold."""
    expected = (f"dataset.palette must be null (the VOC colour map) or one [r, g, b] colour (0-255) per class "
                f"in dataset.class_names order, at least {num_classes} and at most 255 (255 is the ignore label)")
    try:
        table = np.asarray(colors)
    except ValueError:  # rows of different lengths
        raise ConfigError(f"{expected}; some entries are not [r, g, b] triples") from None
    if table.ndim != 2 or table.shape[1] != 3 or not np.issubdtype(table.dtype, np.integer):
        raise ConfigError(f"{expected}; got {colors!r:.80}")
    if table.min() < 0 or table.max() > 255:
        raise ConfigError(f"{expected}; got a value of {table.min() if table.min() < 0 else table.max()}")
    if not num_classes <= len(table) <= 255:
        raise ConfigError(f"{expected}; got {len(table)} colours for {num_classes} classes")
    return table.astype(np.uint8)


def make_palette(colors: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    """A 256x3 palette: the given class colours (or VOC's), IGNORE_COLOR at index 255."""
    palette = voc_palette(256)
    if colors is not None:
        table = _class_colors(colors, num_classes)
        palette[: len(table)] = table
    palette[255] = IGNORE_COLOR
    return palette


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[mask.astype(np.uint8)]


PANEL_MIN_SIZE = 256  # TensorBoard shows an image at its own size: smaller tiles are enlarged to this
PANEL_GAP = 4  # white pixels between the tiles
IGNORE_LABEL = 255


def _enlarged(image: np.ndarray, target: np.ndarray, prediction: np.ndarray,
              min_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles whose shorter side is below `min_size` enlarged by a whole factor: the image smoothly, the
    masks with nearest neighbour, so every label pixel stays a block of one class colour."""
    import cv2

    height, width = target.shape[:2]
    factor = math.ceil(min_size / max(1, min(height, width)))
    if factor <= 1:
        return image, target, prediction
    size = (width * factor, height * factor)
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(target.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST),
            cv2.resize(prediction.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST))


def legend(labels: Sequence[int], class_names: Sequence[str], palette: np.ndarray, width: int) -> np.ndarray:
    """A white strip `width` wide: one colour swatch and class name per label, wrapped over lines."""
    import cv2

    font, scale, line, swatch, pad = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 22, 14, 8
    entries = []
    for label in labels:
        name = "ignore" if label == IGNORE_LABEL else class_names[label] if label < len(class_names) else str(label)
        entries.append((label, name, swatch + 6 + cv2.getTextSize(name, font, scale, 1)[0][0] + 2 * pad))
    rows, x = [[]], pad
    for entry in entries:
        if x + entry[2] > width and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x, entry))
        x += entry[2]
    strip = np.full((len(rows) * line + pad, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        top = pad + r * line
        for x, (label, name, _) in row:
            strip[top:top + swatch, x:x + swatch] = palette[label]
            cv2.rectangle(strip, (x, top), (x + swatch - 1, top + swatch - 1), (96, 96, 96), 1)
            cv2.putText(strip, name, (x + swatch + 6, top + swatch - 2), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def panel(image: np.ndarray, target: np.ndarray, prediction: np.ndarray, palette: np.ndarray,
          class_names: Sequence[str], min_size: int = PANEL_MIN_SIZE) -> np.ndarray:
    """Input | ground truth | prediction, side by side (each at least `min_size` px on its shorter side),
    over a legend of the classes present in either mask; HxWx3 uint8."""
    labels = sorted(set(np.unique(target).tolist()) | set(np.unique(prediction).tolist()))
    image, target, prediction = _enlarged(image, target, prediction, min_size)
    gap = np.full((image.shape[0], PANEL_GAP, 3), 255, np.uint8)  # tiles with black edges stay apart
    tiles = np.concatenate([image, gap, colorize(target, palette), gap, colorize(prediction, palette)], axis=1)
    return np.concatenate([tiles, legend(labels, class_names, palette, tiles.shape[1])], axis=0)


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """CHW normalised float -> HWC uint8 RGB."""
    hwc = image.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(hwc * 255.0 + 0.5, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, prediction: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """The colour mask blended over the image: alpha = weight of the mask."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(prediction, palette).astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str], cell: int = 28) -> np.ndarray:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) as an RGB image,
    class names on both axes, each cell's percentage written in it."""
    import cv2

    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(class_names)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    label_w = max(cv2.getTextSize(name, font, scale, 1)[0][0] for name in class_names) + 12
    size = n * cell
    heat = cv2.applyColorMap(np.uint8(np.round(share * 255)), cv2.COLORMAP_VIRIDIS)
    heat = cv2.resize(heat, (size, size), interpolation=cv2.INTER_NEAREST)
    for r in range(n):
        for c in range(n):
            if share[r, c] >= 0.005:
                text = f"{100 * share[r, c]:.0f}"
                color = (0, 0, 0) if share[r, c] > 0.6 else (255, 255, 255)
                cv2.putText(heat, text, (c * cell + 3, r * cell + cell // 2 + 4), font, 0.33, color, 1, cv2.LINE_AA)
    canvas = np.full((size + label_w + 20, max(size + label_w + 20, 330), 3), 255, np.uint8)
    top, left = label_w, label_w
    canvas[top:top + size, left:left + size] = heat
    for i, name in enumerate(class_names):
        cv2.putText(canvas, name, (4, top + i * cell + cell // 2 + 4), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    columns = np.full((label_w, size, 3), 255, np.uint8)  # written horizontally, then rotated
    columns = np.ascontiguousarray(np.rot90(columns, 1))
    for i, name in enumerate(class_names):
        cv2.putText(columns, name, (4, size - i * cell - cell // 2 + 4), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    canvas[:label_w, left:left + size] = np.rot90(columns, -1)
    cv2.putText(canvas, "rows: ground truth, columns: prediction (% of row)", (4, size + label_w + 14), font, 0.35,
                (0, 0, 0), 1, cv2.LINE_AA)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
