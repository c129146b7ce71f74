"""Shared steps of `segtrain data prepare` for datasets segtrain does not download (ADE20K, PASCAL-Context,
COCO-Stuff, CamVid, LIP): find an archive the user fetched, unpack it once, pair images with masks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from segtrain.data.dataset import Sample
from segtrain.data.download import extract
from segtrain.errors import DataError


def unpack_once(name: str, archives: Path, dest: Path, done: Path, where: str) -> str:
    """Unpack `archives/name` into `dest` unless `done` (a folder the archive creates) exists already.
    `where`: the address the user gets the file from, named in the error when it is missing."""
    if done.is_dir():
        return "already unpacked"
    archive = Path(archives) / name
    if not archive.is_file():
        raise DataError(f"{name} not found in {archives}: download it from {where} and pass its folder with "
                        "--archives DIR (segtrain does not download this dataset)")
    extract(archive, dest)
    if not done.is_dir():
        raise DataError(f"{archive} was unpacked but {done} is missing: the archive does not have the official "
                        "layout")
    return "unpacked"


def paired_samples(image_dir: Path, mask_dir: Path, image_suffix: str, mask_suffix: str,
                   decoder: Callable | None = None, missing: str = "") -> list[Sample]:
    """(image, mask[, decoder]) for every image of `image_dir`, its mask named by the same stem in `mask_dir`.
    The list holds paths only: images and masks are read one at a time when a sample is used, so a split of
    any size costs memory for its file names alone. `missing`: how to get the folder, for the error."""
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} is missing{': ' + missing if missing else ''}")
    images = sorted(image_dir.glob(f"*{image_suffix}"))
    tail = (decoder,) if decoder is not None else ()
    return [(image, mask_dir / f"{image.name[: -len(image_suffix)]}{mask_suffix}", *tail) for image in images]
