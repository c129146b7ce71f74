"""ADE20K scene parsing (ADEChallengeData2016): 150 classes, 20,210 training / 2,000 validation images.

The annotation PNGs store 0 for "other objects" (not evaluated) and 1..150 for the classes of
objectInfo150; a lookup decoder maps them to 255 (ignored) and 0..149 when a mask is read, so the
files stay as published. Class names and colours: conf/dataset/ade20k.yaml.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segtrain.data.archives import paired_samples, unpack_once
from segtrain.data.dataset import LookupDecoder, Sample
from segtrain.errors import DataError

ARCHIVE = "ADEChallengeData2016.zip"
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
SPLITS = ("training", "validation")


def ade_label_table() -> np.ndarray:
    """0 -> 255 (ignore), k -> k - 1 for the 150 classes; other values stay (out of range: data check names them)."""
    table = np.arange(256, dtype=np.uint8)
    table[0] = 255
    table[1:151] = np.arange(150, dtype=np.uint8)
    return table


ADE_DECODER = LookupDecoder(ade_label_table())


def ade20k_samples(root: str | Path, split: str) -> list[Sample]:
    """images/<split>/ADE_*.jpg with annotations/<split>/<same stem>.png, split `training` or `validation`."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"ADE20K has the splits {list(SPLITS)}, not '{split}' (dataset.train_split / val_split)")
    return paired_samples(root / "images" / split, root / "annotations" / split, ".jpg", ".png", ADE_DECODER,
                          missing=f"get {ADE_URL} and run `segtrain data prepare ade20k --root {root.parent} "
                                  "--archives DIR`, or point dataset.root at an ADEChallengeData2016 folder")


def prepare_ade20k(root: Path, archives: Path | None = None) -> dict:
    """Unpack ADEChallengeData2016.zip into `root` (giving root/ADEChallengeData2016) and count the splits."""
    root = Path(root)
    dataset = root / "ADEChallengeData2016"
    report: dict = {"root": str(dataset)}
    report["archive"] = unpack_once(ARCHIVE, Path(archives) if archives else root, root, dataset / "images", ADE_URL)
    for split in SPLITS:
        report[split] = len(ade20k_samples(dataset, split))
    return report
