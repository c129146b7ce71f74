"""`segtrain data prepare voc`: PASCAL VOC 2012 + SBD into the train_aug layout.

Steps: get VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz (download, or take them from
--archives), verify their MD5, unpack, convert SBD's `cls/*.mat` annotations to palette PNGs in
VOC2012/SegmentationClassAug (VOC's own masks are used for the images VOC annotates), and write
ImageSets/Segmentation/train_aug.txt: SBD train + SBD val + VOC train, minus every VOC val image.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from segtrain.data.dataset import read_split_file
from segtrain.data.download import download, extract, verify
from segtrain.errors import DataError
from segtrain.progress import progress_enabled
from segtrain.visualize import make_palette

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    filename: str
    url: str
    md5: str


VOC_ARCHIVE = Archive("VOCtrainval_11-May-2012.tar",
                      "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                      "6cd6e144f989b92b3379bac3b3de84fd")
SBD_ARCHIVE = Archive("benchmark.tgz",
                      "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                      "82b4d87ceb2ed10f6038a1cba92111cb")


def fetch(archive: Archive, root: Path, archives: Path | None, mirror: str | None, check: bool) -> Path:
    """The archive from --archives, else from root/downloads (downloading it there if needed)."""
    md5 = archive.md5 if check else None
    if archives is not None:
        path = archives / archive.filename
        if not path.is_file():
            raise DataError(f"{archive.filename} not found in --archives {archives}; download it from {archive.url}")
        verify(path, md5)
        return path
    url = f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url
    return download(url, root / "downloads" / archive.filename, md5)


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class-index map of an SBD `cls/<id>.mat` file (struct GTcls, field Segmentation)."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise DataError(f"cannot read SBD annotation {path}: {exc}") from None


def save_index_png(mask: np.ndarray, path: Path, palette: list[int]) -> None:
    image = Image.fromarray(mask, mode="P")
    image.putpalette(palette)
    image.save(path)


def build_train_aug(voc: Path, sbd: Path) -> dict[str, int]:
    """Convert SBD masks, write train_aug.txt; returns counts for the report."""
    splits = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_split_file(splits / "train.txt"), read_split_file(splits / "val.txt")
    sbd_ids = read_split_file(sbd / "train.txt") + read_split_file(sbd / "val.txt")
    val = set(voc_val)
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - val)
    out = voc / "SegmentationClassAug"
    out.mkdir(exist_ok=True)
    palette = make_palette(None, 21).flatten().tolist()
    converted = copied = 0
    for image_id in tqdm(train_aug, desc="SegmentationClassAug", unit="mask", disable=not progress_enabled(True)):
        target = out / f"{image_id}.png"
        voc_mask = voc / "SegmentationClass" / f"{image_id}.png"
        if voc_mask.is_file():  # VOC's own annotation, with its 255 borders, where VOC has one
            shutil.copyfile(voc_mask, target)
            copied += 1
        else:
            save_index_png(read_sbd_mat(sbd / "cls" / f"{image_id}.mat"), target, palette)
            converted += 1
        if not (voc / "JPEGImages" / f"{image_id}.jpg").is_file():
            raise DataError(f"train_aug image {image_id}.jpg is missing from {voc / 'JPEGImages'}")
    (splits / "train_aug.txt").write_text("\n".join(train_aug) + "\n")
    return {"train": len(voc_train), "val": len(voc_val), "sbd": len(set(sbd_ids)), "train_aug": len(train_aug),
            "converted_from_sbd": converted, "copied_from_voc": copied}


def prepare_voc(root: Path, archives: Path | None = None, mirror: str | None = None, check: bool = True) -> dict:
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    if not (voc / "ImageSets" / "Segmentation" / "val.txt").is_file():
        extract(fetch(VOC_ARCHIVE, root, archives, mirror, check), root)
    else:
        log.info("VOC 2012 already unpacked in %s", voc)
    if not (sbd / "train.txt").is_file():
        extract(fetch(SBD_ARCHIVE, root, archives, mirror, check), root)
    else:
        log.info("SBD already unpacked in %s", sbd)
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", sbd / "cls"):
        if not folder.is_dir():
            raise DataError(f"{folder} is missing after unpacking; the archives do not have the official layout")
    counts = build_train_aug(voc, sbd)
    counts["root"] = str(voc)
    return counts
