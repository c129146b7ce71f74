"""Your own data: `images/` and `masks/` folders matched by file stem.

Masks are single-channel PNGs of class indices (255 = ignore), optionally remapped through
`value_map` (raw value -> class, e.g. {255: 1} for 0/255 binary masks), or RGB colour PNGs decoded
through the class colours given in the config. Splits come from `<split_dir>/<split>.txt` files
listing stems, or from a seeded random split into `train` and `val`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from segtrain.data.dataset import LOSSY_MASK_SUFFIXES, ColorDecoder, LookupDecoder, Sample, read_split_file
from segtrain.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}") from None


def _by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Files by stem. An entry named like an image that is not a readable file (a broken symlink, a
    symlink loop, no read permission) is an error naming it, never silently left out."""
    files = {}
    for path in _entries(folder):
        if path.suffix.lower() not in extensions:
            continue
        try:
            path.stat()
        except OSError as exc:
            raise DataError(f"{path} cannot be read ({exc.strerror or exc}: a broken symlink or a symlink loop?); "
                            "fix or remove it") from None
        if not os.access(path, os.R_OK):
            raise DataError(f"{path} is not readable (permissions); fix or remove it")
        if path.is_file():
            if path.stem in files:
                raise DataError(f"two files share the stem '{path.stem}' in {folder}: {files[path.stem].name}, "
                                f"{path.name}; stems must be unique")
            files[path.stem] = path
    return files


def _byte(value: object, what: str) -> int:
    if isinstance(value, bool):
        value = None
    try:
        number = int(str(value).strip()) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, int) or not 0 <= number <= 255:
        raise ConfigError(f"dataset.source.value_map: {what} {value!r} is not an integer in 0..255; write it as "
                          "raw value -> class index, e.g. 'dataset.source.value_map={255:1}'")
    return number


def value_map_table(value_map: Mapping | None) -> np.ndarray | None:
    """The 256-entry lookup table of `value_map`; values it does not list keep their value."""
    if not value_map:
        return None
    if not isinstance(value_map, Mapping):
        raise ConfigError(f"dataset.source.value_map must map raw mask values to class indices, e.g. "
                          f"'dataset.source.value_map={{255:1}}'; got {value_map!r}")
    table = np.arange(256, dtype=np.uint8)
    for raw, label in value_map.items():
        table[_byte(raw, "raw value")] = _byte(label, f"class index for {raw}:")
    return table


def _mask_decoder(mask_format: str, colors: list | None, ignore_colors: list | None,
                  value_map: Mapping | None) -> ColorDecoder | LookupDecoder | None:
    if mask_format not in ("index", "rgb"):
        raise ConfigError(f"dataset.source.mask_format must be 'index' or 'rgb', got {mask_format!r}")
    if mask_format == "rgb":
        if value_map:
            raise ConfigError("dataset.source.value_map maps the values of single-channel masks "
                              "(mask_format=index); with mask_format=rgb, dataset.source.colors maps colours to "
                              "classes: remove value_map")
        if not colors:
            raise ConfigError("dataset.source.mask_format=rgb needs dataset.source.colors: one [R, G, B] per class")
        return ColorDecoder(colors, ignore_colors)
    table = value_map_table(value_map)
    return LookupDecoder(table) if table is not None else None


def ratio_split(stems: list[str], split: str, val_ratio: float, seed: int) -> list[str]:
    """A reproducible split: the same stems, ratio and seed always give the same train/val sets."""
    if split not in ("train", "val", "all"):
        raise ConfigError(f"split '{split}' does not exist without split files: use train, val or all "
                          "(or set dataset.source.split_dir)")
    if not 0.0 < val_ratio < 1.0:
        raise ConfigError(f"dataset.source.val_ratio must be in (0, 1), got {val_ratio}")
    if split == "all":
        return stems
    order = np.random.default_rng(seed).permutation(len(stems))
    num_val = max(1, round(len(stems) * val_ratio)) if len(stems) > 1 else 0
    chosen = sorted(order[:num_val]) if split == "val" else sorted(order[num_val:])
    return [stems[i] for i in chosen]


def folder_samples(
    root: str | Path,
    split: str,
    image_dir: str = "images",
    mask_dir: str = "masks",
    mask_format: str = "index",
    value_map: Mapping | None = None,
    colors: list | None = None,
    ignore_colors: list | None = None,
    split_dir: str | None = None,
    val_ratio: float = 0.1,
    seed: int = 0,
) -> list[Sample]:
    root = Path(root)
    images_path, masks_path = root / image_dir, root / mask_dir
    for folder, key in ((images_path, "image_dir"), (masks_path, "mask_dir")):
        if not folder.is_dir():
            raise DataError(f"{folder} not found: dataset.root={root} must contain dataset.source.{key}={folder.name}/")
    decoder = _mask_decoder(mask_format, colors, ignore_colors, value_map)
    images = _by_stem(images_path, IMAGE_EXTENSIONS)
    masks = _by_stem(masks_path, MASK_EXTENSIONS)
    # JPEG masks are kept under their own name, so that reading or `data check` says why they are refused.
    lossy_masks = _by_stem(masks_path, LOSSY_MASK_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_path}")
    if split_dir:
        stems = read_split_file(root / split_dir / f"{split}.txt")
        unknown = [s for s in stems if s not in images]
        if unknown:
            raise DataError(f"{root / split_dir / f'{split}.txt'} lists stems without an image in {images_path}: "
                            f"{unknown[:5]}")
    else:
        stems = ratio_split(sorted(images), split, val_ratio, seed)
    samples: list[Sample] = []
    for stem in stems:
        # A missing mask keeps its expected name, so that reading or `data check` names it.
        mask = masks.get(stem) or lossy_masks.get(stem) or masks_path / f"{stem}.png"
        samples.append((images[stem], mask, decoder) if decoder else (images[stem], mask))
    return samples
