"""PASCAL-Context: VOC 2010 images with whole-scene annotations, 4,998 train / 5,105 val images.

The official annotations (trainval.tar.gz) are one .mat file per image whose LabelMap holds ids of a
459-class list (labels.txt). The benchmark keeps the 59 most frequent classes (59_labels.txt); every other
id is background. `segtrain data prepare pascal_context` converts the LabelMaps once into index PNGs
(0 background, 1..59 the classes) and writes the VOC 2010 train/val split (ImageSets/Main, restricted to
annotated images); then
- dataset=pascal_context (59 classes) ignores background: a decoder maps 0 -> 255 and k -> k - 1;
- dataset=pascal_context60 (60 classes) reads the PNGs as stored, background = class 0.
The classes are ordered by their 459-class id (alphabetically), the order of HRNet-Semantic-Segmentation
and mmsegmentation, so official checkpoints' classifiers line up. Names: conf/dataset/pascal_context.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from segtrain.data.archives import unpack_once
from segtrain.data.dataset import LookupDecoder, Sample, voc_layout_samples
from segtrain.errors import DataError

VOC2010_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"
CONTEXT_PAGE = "https://cs.stanford.edu/~roozbeh/pascal-context/"
VOC2010_ARCHIVE, CONTEXT_ARCHIVE = "VOCtrainval_03-May-2010.tar", "trainval.tar.gz"
MASK_DIR, SPLIT_DIR = "SegmentationClassContext", "ImageSets/SegmentationContext"
# The 459-class ids of the 59 classes (HRNet-Semantic-Segmentation lib/datasets/pascal_ctx.py, mmsegmentation's
# converter), ascending: position + 1 is the class's value in the prepared PNGs.
CONTEXT59_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
                 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349,
                 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
# Names 59_labels.txt may spell differently from labels.txt.
NAME_ALIASES = {"diningtable": "table", "bedcloth": "bedclothes", "clothes": "cloth"}


def background_ignored_table() -> np.ndarray:
    """Prepared PNG value -> 59-class index: 0 (background) -> 255, k -> k - 1."""
    table = np.arange(256, dtype=np.uint8) - 1
    table[0] = table[255] = 255
    return table.astype(np.uint8)


CONTEXT59_DECODER = LookupDecoder(background_ignored_table())


def pascal_context_samples(root: str | Path, split: str, background: str = "ignore") -> list[Sample]:
    """JPEGImages/<id>.jpg with SegmentationClassContext/<id>.png for the ids of
    ImageSets/SegmentationContext/<split>.txt; background: `ignore` (59 classes) or `class` (60)."""
    root = Path(root)
    if background not in ("ignore", "class"):
        raise DataError(f"dataset.source.background must be 'ignore' (59 classes) or 'class' (60), got {background!r}")
    if not (root / SPLIT_DIR / f"{split}.txt").is_file():
        raise DataError(f"PASCAL-Context split '{split}' not found: {root / SPLIT_DIR / f'{split}.txt'} is missing "
                        f"(dataset.root={root}). Get {VOC2010_URL} and trainval.tar.gz, labels.txt and 59_labels.txt "
                        f"from {CONTEXT_PAGE}, then run `segtrain data prepare pascal_context --root "
                        f"{root.parent.parent} --archives DIR`")
    samples = voc_layout_samples(root, split, mask_dir=MASK_DIR, split_dir=SPLIT_DIR)
    return [(image, mask, CONTEXT59_DECODER) for image, mask in samples] if background == "ignore" else samples


def read_label_list(path: Path) -> dict[int, str]:
    """`id: name` lines (labels.txt, 59_labels.txt) -> {id: name}."""
    entries: dict[int, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*(\d+)\s*:\s*(.+?)\s*$", line)
        if match:
            entries[int(match.group(1))] = match.group(2)
    if not entries:
        raise DataError(f"{path} lists no `id: name` lines: use the file from {CONTEXT_PAGE}")
    return entries


def context_lookup(labels_459: Path, labels_59: Path) -> np.ndarray:
    """459-class id -> prepared PNG value: the 59 classes of 59_labels.txt (found by name in labels.txt)
    -> 1..59 in ascending id order, every other id -> 0 (background)."""
    ids_by_name = {name: index for index, name in read_label_list(labels_459).items()}
    ids = []
    for name in read_label_list(labels_59).values():
        found = ids_by_name.get(name, ids_by_name.get(NAME_ALIASES.get(name, name)))
        if found is None:
            raise DataError(f"class '{name}' of {labels_59} is not in {labels_459}: use the two files from "
                            f"{CONTEXT_PAGE}")
        ids.append(found)
    if tuple(sorted(ids)) != CONTEXT59_IDS:
        raise DataError(f"{labels_59} and {labels_459} give the 459-class ids {sorted(ids)[:8]}..., not the 59 "
                        f"classes of the benchmark: use the two files from {CONTEXT_PAGE}")
    table = np.zeros(max(read_label_list(labels_459)) + 1, dtype=np.uint8)
    table[list(CONTEXT59_IDS)] = np.arange(1, len(CONTEXT59_IDS) + 1, dtype=np.uint8)
    return table


def read_label_map(path: Path) -> np.ndarray:
    import scipy.io

    try:
        return np.asarray(scipy.io.loadmat(path)["LabelMap"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise DataError(f"cannot read the LabelMap of {path}: {exc}") from None


def convert_label_map(path: Path, table: np.ndarray) -> np.ndarray:
    label_map = read_label_map(path)
    if label_map.size and (label_map.min() < 0 or label_map.max() >= len(table)):
        raise DataError(f"{path} has LabelMap ids outside 0..{len(table) - 1} (labels.txt)")
    return table[label_map]


def _find(name: str, folders: list[Path]) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{name} not found in {', '.join(str(f) for f in folders)}: download it from {CONTEXT_PAGE} "
                    "into the --archives folder")


def prepare_pascal_context(root: Path, archives: Path | None = None) -> dict:
    """Unpack VOC 2010 and the context annotations under root, write SegmentationClassContext/*.png (once per
    image: existing PNGs are kept) and ImageSets/SegmentationContext/{train,val}.txt."""
    from PIL import Image
    from tqdm import tqdm

    from segtrain.progress import progress_enabled
    from segtrain.visualize import make_palette

    root = Path(root)
    archives = Path(archives) if archives else root
    voc = root / "VOCdevkit" / "VOC2010"
    report: dict = {"root": str(voc)}
    report[VOC2010_ARCHIVE] = unpack_once(VOC2010_ARCHIVE, archives, root, voc / "JPEGImages", VOC2010_URL)
    report[CONTEXT_ARCHIVE] = unpack_once(CONTEXT_ARCHIVE, archives, voc, voc / "trainval", CONTEXT_PAGE)
    folders = [archives, voc, voc / "trainval"]
    table = context_lookup(_find("labels.txt", folders), _find("59_labels.txt", folders))
    palette = make_palette(None, 256).flatten().tolist()
    (voc / MASK_DIR).mkdir(exist_ok=True)
    (voc / SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        ids = [i for i in (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
               if (voc / "trainval" / f"{i}.mat").is_file()]
        for image_id in tqdm(ids, desc=f"{split} masks", unit="mask", disable=not progress_enabled(True)):
            target = voc / MASK_DIR / f"{image_id}.png"
            if not target.is_file():
                mask = Image.fromarray(convert_label_map(voc / "trainval" / f"{image_id}.mat", table), mode="P")
                mask.putpalette(palette)
                mask.save(target)
        (voc / SPLIT_DIR / f"{split}.txt").write_text("\n".join(ids) + "\n")
        report[split] = len(ids)
    return report
