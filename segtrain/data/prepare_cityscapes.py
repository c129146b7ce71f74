"""`segtrain data prepare cityscapes`: unpack the official zips and optionally write train-id masks.

Cityscapes needs a registered account, so segtrain does not download it: get
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com
and point --archives at their folder (default: the root itself).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from tqdm import tqdm

from segtrain.data.cityscapes import LABEL_TO_TRAIN
from segtrain.data.dataset import read_mask
from segtrain.data.download import extract
from segtrain.errors import DataError
from segtrain.progress import progress_enabled

ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
DOWNLOAD_PAGE = "https://www.cityscapes-dataset.com/downloads/"


def write_train_id_masks(root: Path, annotation: str = "gtFine") -> int:
    """*_labelTrainIds.png beside every *_labelIds.png (19 train ids, 255 elsewhere)."""
    sources = sorted((root / annotation).glob("*/*/*_labelIds.png"))
    for source in tqdm(sources, desc="labelTrainIds", unit="mask", disable=not progress_enabled(True)):
        target = source.with_name(source.name.replace("_labelIds.png", "_labelTrainIds.png"))
        Image.fromarray(LABEL_TO_TRAIN[read_mask(source)], mode="L").save(target)
    return len(sources)


def prepare_cityscapes(root: Path, archives: Path | None = None, train_ids: bool = False) -> dict:
    root = Path(root)
    archives = Path(archives) if archives else root
    counts: dict = {"root": str(root)}
    for name in ARCHIVES:
        folder = name.split("_")[0]
        if (root / folder).is_dir():
            counts[folder] = "already unpacked"
            continue
        archive = archives / name
        if not archive.is_file():
            raise DataError(f"{name} not found in {archives}: download it (registration required) from "
                            f"{DOWNLOAD_PAGE} and pass its folder with --archives DIR")
        extract(archive, root)
        counts[folder] = "unpacked"
    for split in ("train", "val"):
        counts[f"{split}_images"] = len(list((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")))
    if train_ids:
        counts["labelTrainIds_written"] = write_train_id_masks(root)
    return counts
