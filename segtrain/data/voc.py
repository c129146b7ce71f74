"""PASCAL VOC 2012 (+ SBD "aug"): 21 classes (names in conf/dataset/voc.yaml), 255 = borders (ignored)."""

from __future__ import annotations

from pathlib import Path

from segtrain.data.dataset import Sample, voc_layout_samples
from segtrain.errors import DataError

VOC_TRAINVAL_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"


def voc_samples(root: str | Path, split: str) -> list[Sample]:
    """Splits train, val, trainval (SegmentationClass) and train_aug (SegmentationClassAug)."""
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(
            f"PASCAL VOC split '{split}' not found: {split_file} is missing (dataset.root={root}). "
            f"Get VOC 2012 with `segtrain data prepare voc --root data/` (downloads {VOC_TRAINVAL_URL} "
            "and SBD, builds train_aug), or point dataset.root at an existing VOCdevkit/VOC2012 folder."
        )
    mask_dir = "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
    return voc_layout_samples(root, split, mask_dir=mask_dir)
