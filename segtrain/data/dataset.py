"""Reading (image, mask) file pairs: the one code path every dataset goes through."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from segtrain.errors import DataError

# (image, mask) or (image, mask, lut): a 256-entry uint8 table mapping raw mask values to class
# indices (e.g. Cityscapes label ids -> train ids), applied when the mask is read.
Sample = tuple


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3; grayscale and RGBA are converted, 16-bit scaled to 8-bit."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise DataError(f"cannot read image {path} (missing, truncated or not an image)")
    if data.dtype == np.uint16:
        data = (data // 257).astype(np.uint8)
    if data.ndim == 2:
        return cv2.cvtColor(data, cv2.COLOR_GRAY2RGB)
    if data.shape[2] == 4:
        return cv2.cvtColor(data, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """Class indices HxW uint8, read as palette indices (never through an RGB conversion)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"mask {path} is a {img.mode} image; masks must be single-channel index PNGs "
                    "(palette or grayscale) whose values are class indices, 255 = ignore"
                )
            return np.array(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read mask {path}: {exc}") from None


class SegmentationDataset(torch.utils.data.Dataset):
    """Items are `{"image": float CHW, "mask": int64 HW, "index": int}` after `transform`.

    `transform(image, mask, seed)` receives a per-sample seed so augmentation does not depend on
    which worker process reads the sample. An index may be an int or an (index, seed) pair.
    """

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        transform: Callable[[np.ndarray, np.ndarray, int], tuple[torch.Tensor, torch.Tensor]],
        ignore_index: int = 255,
    ) -> None:
        self.samples = samples
        self.num_classes = num_classes
        self.transform = transform
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path, *lut = self.samples[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if lut:
            mask = lut[0][mask]
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} "
                f"is {mask.shape[1]}x{mask.shape[0]}"
            )
        invalid = (mask >= self.num_classes) & (mask != self.ignore_index)
        if invalid.any():
            values = sorted(set(np.unique(mask[invalid]).tolist()))
            raise DataError(
                f"mask {mask_path} has label values {values[:8]} outside 0..{self.num_classes - 1} "
                f"and the ignore index {self.ignore_index}"
            )
        return image, mask

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, index_seed(item))
        image, mask = self.load(index)
        image_t, mask_t = self.transform(image, mask, seed)
        return {"image": image_t, "mask": mask_t, "index": index}


def index_seed(index: int) -> int:
    return int(index) & 0x7FFFFFFF


def read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_layout_samples(
    root: str | Path,
    split: str,
    image_dir: str = "JPEGImages",
    mask_dir: str = "SegmentationClass",
    split_dir: str = "ImageSets/Segmentation",
    image_ext: str = ".jpg",
    mask_ext: str = ".png",
) -> list[Sample]:
    """(image, mask) pairs of a VOC-style tree: ids listed in <split_dir>/<split>.txt."""
    root = Path(root)
    ids = read_split_file(root / split_dir / f"{split}.txt")
    if not ids:
        raise DataError(f"split file {root / split_dir / f'{split}.txt'} lists no samples")
    return [(root / image_dir / f"{i}{image_ext}", root / mask_dir / f"{i}{mask_ext}") for i in ids]
