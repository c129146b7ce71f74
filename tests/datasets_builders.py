"""Miniature VOC, SBD and Cityscapes trees and archives, built by the tests themselves."""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from segtrain.visualize import make_palette

VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002", "2007_000003"], ["2007_000004", "2007_000005"]
SBD_TRAIN, SBD_VAL = ["2007_000002", "2007_000004", "2008_000010", "2008_000011"], ["2008_000012", "2007_000005"]


def write_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(make_palette(None, 21).flatten().tolist())
    image.save(path)


def random_mask(seed: int, height: int = 12, width: int = 16, border: bool = True) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, 21, (height, width)).astype(np.uint8)
    if border:
        mask[0, :] = 255
    return mask


def build_voc_tree(base: Path) -> Path:
    """base/VOCdevkit/VOC2012 with JPEGs for every VOC and SBD id, VOC masks for train + val."""
    voc = base / "VOCdevkit" / "VOC2012"
    ids = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))
    for n, image_id in enumerate(ids):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", 12, 16, n)
    for n, image_id in enumerate(VOC_TRAIN + VOC_VAL):
        write_palette_png(voc / "SegmentationClass" / f"{image_id}.png", random_mask(100 + n))
    splits = voc / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True)
    for name, ids_ in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
        (splits / f"{name}.txt").write_text("\n".join(ids_) + "\n")
    return voc


def sbd_mask(image_id: str) -> np.ndarray:
    return random_mask(zlib.crc32(image_id.encode()) % 1000, border=False)


def build_sbd_tree(base: Path) -> Path:
    """base/benchmark_RELEASE/dataset with cls/<id>.mat in SBD's struct format and train/val lists."""
    dataset = base / "benchmark_RELEASE" / "dataset"
    (dataset / "cls").mkdir(parents=True)
    for image_id in SBD_TRAIN + SBD_VAL:
        gt = {"Segmentation": sbd_mask(image_id), "Boundaries": np.empty((0,), dtype=object),
              "CategoriesPresent": np.array([1], dtype=np.uint8)}
        scipy.io.savemat(dataset / "cls" / f"{image_id}.mat", {"GTcls": gt})
    (dataset / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (dataset / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    return dataset


def build_voc_archives(work: Path) -> Path:
    """work/archives/{VOCtrainval_11-May-2012.tar, benchmark.tgz}."""
    build_voc_tree(work / "voc_src")
    build_sbd_tree(work / "sbd_src")
    archives = work / "archives"
    archives.mkdir()
    with tarfile.open(archives / "VOCtrainval_11-May-2012.tar", "w") as tar:
        tar.add(work / "voc_src" / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(archives / "benchmark.tgz", "w:gz") as tar:
        tar.add(work / "sbd_src" / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return archives


CITY_FRAMES = {"train": ["aachen_000000_000019", "aachen_000001_000019"], "val": ["frankfurt_000000_000294"]}


def build_cityscapes_archives(work: Path) -> Path:
    """work/zips/{leftImg8bit,gtFine}_trainvaltest.zip with label ids covering 0..33 and -1 (255)."""
    src = work / "city_src"
    for split, frames in CITY_FRAMES.items():
        for n, frame in enumerate(frames):
            city = frame.split("_")[0]
            image = src / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(image), np.full((8, 36, 3), 40 * n, np.uint8))
            labels = np.tile(np.arange(36, dtype=np.uint8), (8, 1))
            labels[:, 34:] = 255  # license plate (-1) is stored as 255
            label = src / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png"
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels, mode="L").save(label)
    zips = work / "zips"
    zips.mkdir()
    for top, name in (("leftImg8bit", "leftImg8bit_trainvaltest.zip"), ("gtFine", "gtFine_trainvaltest.zip")):
        with zipfile.ZipFile(zips / name, "w") as archive:
            for path in sorted((src / top).rglob("*.png")):
                archive.write(path, path.relative_to(src).as_posix())
            archive.writestr("README", "mini Cityscapes for tests")
    return zips


def write_folder_dataset(root: Path, count: int, num_classes: int, height: int = 40, width: int = 56) -> Path:
    """root/images/img<n>.jpg and root/masks/img<n>.png (class indices 0..num_classes-1), the folder layout."""
    for n in range(count):
        write_jpeg(root / "images" / f"img{n}.jpg", height, width, n)
        mask = np.random.default_rng(1000 + n).integers(0, num_classes, (height, width)).astype(np.uint8)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{n}.png")
    return root


def folder_dataset_with_a_bad_mask(root: Path, bad: int) -> Path:
    """12 images (train 0-9, val 10-11); image `bad` has an RGB mask, a DataError when read."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 2, (40, 40), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(str(i) for i in range(10)))
    (root / "splits" / "val.txt").write_text("10\n11\n")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8) + 1).save(root / "masks" / f"{bad}.png")
    return root
