"""LIP (Look Into Person) human parsing: 30,462 train / 10,000 val images, 20 classes (background + 19 parts).

Masks are index PNGs (0..19) used as stored. Left and right parts swap under a horizontal flip
(dataset.flip_pairs in conf/dataset/lip.yaml: arms 14/15, legs 16/17, shoes 18/19).
"""

from __future__ import annotations

from pathlib import Path

from segtrain.data.archives import paired_samples, unpack_once
from segtrain.data.dataset import Sample
from segtrain.errors import DataError

LIP_URL = "http://sysu-hcp.net/lip/overview.php"
ARCHIVES = {"TrainVal_images.zip": "TrainVal_images",
            "TrainVal_parsing_annotations.zip": "TrainVal_parsing_annotations"}
SPLITS = ("train", "val")


def lip_samples(root: str | Path, split: str) -> list[Sample]:
    """TrainVal_images/<split>_images/*.jpg with TrainVal_parsing_annotations/<split>_segmentations/<stem>.png."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"LIP has the splits {list(SPLITS)}, not '{split}' (dataset.train_split / val_split)")
    return paired_samples(root / "TrainVal_images" / f"{split}_images",
                          root / "TrainVal_parsing_annotations" / f"{split}_segmentations", ".jpg", ".png",
                          missing=f"get TrainVal_images.zip and TrainVal_parsing_annotations.zip ({LIP_URL}) and run "
                                  f"`segtrain data prepare lip --root {root} --archives DIR`")


def prepare_lip(root: Path, archives: Path | None = None) -> dict:
    root = Path(root)
    archives = Path(archives) if archives else root
    report: dict = {"root": str(root)}
    for name, folder in ARCHIVES.items():
        report[name] = unpack_once(name, archives, root, root / folder, LIP_URL)
    for split in SPLITS:
        report[split] = len(lip_samples(root, split))
    return report
