"""COCO-Stuff 164k: COCO 2017 images (118k train / 5k val) with the stuffthingmaps PNGs, 171 classes.

A stuffthingmaps PNG stores COCO id - 1: 0..90 the things (80 of which are used: 11 thing ids have no
annotations), 91..181 the 91 stuff classes, 255 unlabelled. A lookup decoder maps the 171 used values
to 0..170 in id order and everything else to 255 when a mask is read. Names: conf/dataset/coco_stuff164k.yaml.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segtrain.data.archives import paired_samples, unpack_once
from segtrain.data.dataset import LookupDecoder, Sample

IMAGES_URL = "http://images.cocodataset.org/zips/"  # train2017.zip, val2017.zip
STUFFTHINGMAPS_URL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip"
# COCO thing ids without annotations (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door,
# blender, hair brush), as stored in stuffthingmaps (id - 1).
UNUSED_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
SPLITS = ("train2017", "val2017")


def stuffthingmap_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    used = [value for value in range(182) if value not in UNUSED_VALUES]
    table[used] = np.arange(len(used), dtype=np.uint8)
    return table


COCO_STUFF_DECODER = LookupDecoder(stuffthingmap_table())


def coco_stuff_samples(root: str | Path, split: str) -> list[Sample]:
    """images/<split>/*.jpg with annotations/<split>/<same stem>.png (stuffthingmaps), split train2017 or val2017."""
    root = Path(root)
    return paired_samples(root / "images" / split, root / "annotations" / split, ".jpg", ".png",
                          COCO_STUFF_DECODER, missing=f"run `segtrain data prepare coco_stuff164k --root {root} "
                          "--archives DIR` with train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip")


def prepare_coco_stuff(root: Path, archives: Path | None = None) -> dict:
    """Images into root/images/<split>, stuffthingmaps into root/annotations/<split>."""
    root = Path(root)
    archives = Path(archives) if archives else root
    report: dict = {"root": str(root)}
    for split in SPLITS:
        report[f"{split}.zip"] = unpack_once(f"{split}.zip", archives, root / "images", root / "images" / split,
                                             IMAGES_URL + f"{split}.zip")
    report["stuffthingmaps_trainval2017.zip"] = unpack_once(
        "stuffthingmaps_trainval2017.zip", archives, root / "annotations", root / "annotations" / "val2017",
        STUFFTHINGMAPS_URL)
    for split in SPLITS:
        report[split] = len(coco_stuff_samples(root, split))
    return report
