"""Label handling checked against real label files from ../shared/realdata (skipped where absent)."""

from pathlib import Path

import numpy as np
import pytest

from segtrain.data.cityscapes import LABEL_TO_TRAIN, cityscapes_samples
from segtrain.data.dataset import SegmentationDataset, read_mask
from segtrain.data.transforms import eval_transform

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason=f"real data fixtures not found at {REALDATA}")


def test_every_cityscapes_label_id_maps_to_its_train_id():
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(256):
        assert LABEL_TO_TRAIN[label_id] == expected.get(label_id, 255), label_id


@needs_realdata
def test_cityscapes_label_ids_map_to_the_official_train_ids(tmp_path):
    frame = REALDATA / "cityscapes_frame"
    stem = "frankfurt_000000_000294"
    (tmp_path / "leftImg8bit" / "val" / "frankfurt").mkdir(parents=True)
    (tmp_path / "gtFine" / "val" / "frankfurt").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png").symlink_to(
        frame / f"{stem}_leftImg8bit.png")
    (tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png").symlink_to(
        frame / f"{stem}_gtFine_labelIds.png")
    samples = cityscapes_samples(tmp_path, "val")
    dataset = SegmentationDataset(samples, 19, eval_transform(19))
    mapped = dataset[0]["mask"].numpy()
    official = read_mask(frame / f"{stem}_gtFine_labelTrainIds.png")
    raw = read_mask(frame / f"{stem}_gtFine_labelIds.png")
    # The fixture's two files were downscaled separately, so a few boundary pixels disagree;
    # for every label id present, the official train id at its pixels must be ours.
    assert (mapped == official).mean() > 0.99
    for label_id in np.unique(raw):
        values, counts = np.unique(official[raw == label_id], return_counts=True)
        assert values[counts.argmax()] == LABEL_TO_TRAIN[label_id], label_id
    assert len(np.unique(official)) > 5
