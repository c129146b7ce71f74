"""The embedded demo dataset: coloured shapes on textured, noisy backgrounds.

Generated deterministically from a seed into a VOC-style tree (JPEG images, palette PNG masks,
ImageSets/Segmentation/{train,val}.txt) on first use, then read back through the same file-based path
as real datasets. Each class has its own shape and its own noisy colour range; object borders are
labelled 255 (ignore) as in PASCAL VOC.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segtrain.data.dataset import Sample, voc_layout_samples
from segtrain.errors import DataError
from segtrain.visualize import make_palette

CLASS_NAMES = ("background", "disc", "square", "triangle", "cross")
# Hue (OpenCV 0..179) centre per foreground class; saturation/value vary around these.
_CLASS_HUES = {1: 0, 2: 60, 3: 110, 4: 25}
_META = "shapes.json"


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.uniform(60, 200)
    tint = rng.uniform(-20, 20, size=3)  # low saturation, so backgrounds never look like a class
    # Texture is mostly luminance with a little chroma: backgrounds must not take a class's colour.
    coarse = rng.normal(0, 25, size=(max(2, height // 16), max(2, width // 16), 1))
    coarse = coarse + rng.normal(0, 5, size=coarse.shape[:2] + (3,))
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width]
    period, angle = rng.uniform(6, 24), rng.uniform(0, np.pi)
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image = base + tint + texture + stripes[..., None] * rng.uniform(0, 1)
    return image


def _class_color(rng: np.random.Generator, label: int) -> np.ndarray:
    hue = (_CLASS_HUES[label] + rng.integers(-6, 7)) % 180
    hsv = np.uint8([[[hue, rng.integers(150, 256), rng.integers(150, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _draw_shape(rng: np.random.Generator, canvas: np.ndarray, label: int, height: int, width: int) -> None:
    size = int(rng.integers(10, max(12, min(height, width) // 3)))
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    if label == 1:
        cv2.circle(canvas, (cx, cy), size, 1, -1)
        return
    angle = rng.uniform(0, 2 * np.pi)
    if label == 2:
        corners = [angle + k * np.pi / 2 + np.pi / 4 for k in range(4)]
        points = [(cx + size * np.cos(a), cy + size * np.sin(a)) for a in corners]
    elif label == 3:
        corners = [angle + k * 2 * np.pi / 3 for k in range(3)]
        points = [(cx + 1.3 * size * np.cos(a), cy + 1.3 * size * np.sin(a)) for a in corners]
    else:
        arm, half = size, max(3, size // 3)
        base = [(-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
                (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half)]
        c, s = np.cos(angle), np.sin(angle)
        points = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    cv2.fillPoly(canvas, [np.round(np.array(points)).astype(np.int32)], 1)


def render_sample(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 mask with 255 borders) pair."""
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        region = np.zeros((height, width), dtype=np.uint8)
        _draw_shape(rng, region, cls, height, width)
        inside = region.astype(bool)
        color = _class_color(rng, cls)
        shading = rng.normal(0, 12, size=(height, width, 1))
        image[inside] = (color + shading[inside]).reshape(-1, 3)
        label[inside] = cls
    image += rng.normal(0, 8, size=image.shape)
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    label[border] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def generate_shapes(
    root: Path, num_train: int, num_val: int, image_size: tuple[int, int], seed: int
) -> None:
    """Write the dataset to `root` (missing or an empty folder) atomically: a partial tree never appears
    under that name, and nothing already there is deleted."""
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover only (the name holds its PID)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True)
    palette = make_palette(None, len(CLASS_NAMES)).flatten().tolist()
    rng = np.random.default_rng(seed)
    base_h, base_w = image_size
    splits = {"train": num_train, "val": num_val}
    for split, count in splits.items():
        ids = []
        for n in range(count):
            # Sizes vary per image, so validation really runs at each image's own resolution.
            height = int(base_h * rng.uniform(0.85, 1.15))
            width = int(base_w * rng.uniform(0.85, 1.15))
            image, mask = render_sample(rng, height, width)
            name = f"{split}_{n:05d}"
            cv2.imwrite(str(tmp / "JPEGImages" / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(tmp / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (tmp / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    meta = {"num_train": num_train, "num_val": num_val, "image_size": list(image_size), "seed": seed}
    (tmp / _META).write_text(json.dumps(meta))
    try:
        tmp.rename(root)  # replaces an empty folder, never one with files in it
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"dataset.root={root}: could not put the generated shapes dataset in place ({exc}); "
                        "point dataset.root at an empty or new folder") from None


@contextlib.contextmanager
def generation_lock(root: Path) -> Iterator[None]:
    """One generating process per dataset folder (`.<name>.lock` beside it, kept: an empty file)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f".{root.name}.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_meta(meta_file: Path) -> dict | None:
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _refuse_other_dataset(root: Path, found: dict | None, wanted: dict) -> None:
    """An existing folder is never deleted nor regenerated: a running job may be reading it."""
    if found == wanted:
        return
    if found is None:
        if root.exists() and any(root.iterdir()):
            raise DataError(f"dataset.root={root} exists but is not a generated shapes dataset (no {_META}); "
                            "point dataset.root at an empty or new folder")
        return
    differs = [key for key in wanted if (found or {}).get(key) != wanted[key]]
    shown = ", ".join(f"dataset.source.{key}={(found or {}).get(key)}" for key in differs)
    raise DataError(
        f"dataset.root={root} holds a shapes dataset generated with {shown or 'other settings'} (its {_META}); "
        f"segtrain never deletes a dataset: use those values, or a new dataset.root for "
        + ", ".join(f"dataset.source.{key}={wanted[key]}" for key in differs)
    )


def ensure_shapes(root: str | Path, num_train: int, num_val: int, image_size: list[int], seed: int) -> Path:
    """The dataset at `root`, generated if the folder is missing or empty; a folder holding anything
    else (another size or seed included) is refused, never replaced."""
    root = Path(root)
    meta = {"num_train": num_train, "num_val": num_val, "image_size": list(image_size), "seed": seed}
    meta_file = root / _META
    found = _read_meta(meta_file)
    _refuse_other_dataset(root, found, meta)
    if found == meta:
        return root
    with generation_lock(root):
        found = _read_meta(meta_file)  # another process may have generated it while this one waited
        _refuse_other_dataset(root, found, meta)
        if found is None:
            generate_shapes(root, num_train, num_val, (int(image_size[0]), int(image_size[1])), seed)
    return root


def shapes_samples(
    root: str | Path,
    split: str,
    num_train: int = 600,
    num_val: int = 100,
    image_size: list[int] = (128, 160),
    seed: int = 0,
) -> list[Sample]:
    root = ensure_shapes(root, num_train, num_val, list(image_size), seed)
    return voc_layout_samples(root, split)
