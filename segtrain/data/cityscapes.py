"""Cityscapes: the 34 label ids mapped to the 19 evaluation ("train") ids, everything else 255.

Class names and the official colours are in conf/dataset/cityscapes.yaml.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segtrain.data.dataset import LookupDecoder, Sample
from segtrain.errors import DataError

# label id -> train id for the ids that are evaluated; the other ids (void, ground, parking, rail
# track, guard rail, bridge, tunnel, polegroup, caravan, trailer, license plate) become 255.
EVALUATED_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def label_id_to_train_id() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in EVALUATED_IDS.items():
        table[label_id] = train_id
    return table


LABEL_TO_TRAIN = label_id_to_train_id()
LABEL_DECODER = LookupDecoder(LABEL_TO_TRAIN)


def cityscapes_samples(root: str | Path, split: str, annotation: str = "gtFine") -> list[Sample]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with <annotation>/<split>/<city>/*_labelTrainIds.png
    when present (already train ids), else *_labelIds.png mapped on the fly."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DataError(
            f"Cityscapes split '{split}' not found: {image_dir} is missing (dataset.root={root}). Download "
            "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com "
            "(registration required) and extract both into dataset.root."
        )
    samples: list[Sample] = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        label_dir = root / annotation / split / image.parent.name
        train_ids = label_dir / f"{stem}_{annotation}_labelTrainIds.png"
        if train_ids.is_file():
            samples.append((image, train_ids))
        else:
            samples.append((image, label_dir / f"{stem}_{annotation}_labelIds.png", LABEL_DECODER))
    if not samples:
        raise DataError(f"no *_leftImg8bit.png images under {image_dir}")
    return samples
