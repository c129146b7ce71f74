"""CONTRIBUTING.md's walk-through, followed step by step: a model, two losses and a dataset source
defined here, one YAML file each in a config folder of their own, then train and `segtrain info`."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.commands.data import check_split
from segtrain.data.dataset import LookupDecoder
from segtrain.data.loading import build_dataset
from segtrain.data.normalization import normalization
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError, DataError
from segtrain.losses import CrossEntropy, SegmentationLoss
from segtrain.models.heads.blocks import conv_bn_relu
from segtrain.models.segmentor import Segmentor


class TinyFCN(Segmentor):
    """3x3 conv-BN-ReLU and a classifier on the deepest feature."""

    def __init__(self, backbone, num_classes: int, channels: int = 64) -> None:
        super().__init__(backbone, num_classes)
        self.head = nn.Sequential(conv_bn_relu(backbone.channels[-1], channels, 3), nn.Conv2d(channels, num_classes, 1))

    def decode(self, features):
        return {"out": self.head(features[-1])}


class LabelSmoothingCrossEntropy(CrossEntropy):
    def __init__(self, num_classes, ignore_index=255, aux_weight=0.4, class_weights=None,
                 smoothing: float = 0.1) -> None:
        super().__init__(num_classes, ignore_index, aux_weight, class_weights)
        self.smoothing = smoothing

    def pass_total(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index,
                               reduction="sum", label_smoothing=self.smoothing)


# ADE20K-style masks: 0 = "other" (ignored), 1..N = the N classes. One decoder shared by every sample.
ADE_SHIFT = LookupDecoder((np.arange(256) - 1) % 256)  # 0 -> 255, v -> v - 1


def ade_style_samples(root: str, split: str, image_dir: str = "images",
                      mask_dir: str = "annotations") -> list[tuple[Path, Path, LookupDecoder]]:
    images = sorted((Path(root) / image_dir / split).glob("*.jpg"))
    if not images:
        raise DataError(f"no .jpg images in {Path(root) / image_dir / split} (dataset.root={root})")
    return [(image, Path(root) / mask_dir / split / f"{image.stem}.png", ADE_SHIFT) for image in images]


class DiceLoss(SegmentationLoss):
    """Soft Dice per image, averaged over the classes, on the labelled pixels; the batch's loss is the
    mean over the images that have a labelled pixel."""

    def __init__(self, num_classes, ignore_index=255, aux_weight=0.4, smooth: float = 1.0) -> None:
        super().__init__(num_classes, ignore_index, aux_weight)
        if smooth <= 0:
            raise ConfigError(f"loss.smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)

    def pass_total(self, logits, target):
        labelled = (target != self.ignore_index).unsqueeze(1)
        probs = logits.float().softmax(dim=1) * labelled
        classes = F.one_hot(torch.where(labelled[:, 0], target, 0), self.num_classes).permute(0, 3, 1, 2)
        classes = classes * labelled
        overlap = (probs * classes).sum((2, 3))
        sizes = probs.sum((2, 3)) + classes.sum((2, 3))
        dice = (2 * overlap + self.smooth) / (sizes + self.smooth)  # (images, classes)
        return (1 - dice.mean(dim=1)).sum()  # an image without labelled pixels: dice 1, adds 0

    def normalizer(self, target):
        return (target != self.ignore_index).flatten(1).any(dim=1).sum().float()


@pytest.fixture()
def my_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "my_conf"
    for group in ("model", "loss", "dataset"):
        (conf / group).mkdir(parents=True)
    (conf / "model" / "tiny_fcn.yaml").write_text(
        "# TinyFCN: one 3x3 conv on the deepest feature.\n_target_: test_contributing.TinyFCN\nchannels: 8\n")
    (conf / "loss" / "label_smoothing.yaml").write_text(
        "_target_: test_contributing.LabelSmoothingCrossEntropy\naux_weight: 0.4\nclass_weights: null\n"
        "smoothing: 0.1\n")
    (conf / "loss" / "dice.yaml").write_text("_target_: test_contributing.DiceLoss\naux_weight: 0.4\nsmooth: 1.0\n")
    (conf / "dataset" / "ade_style.yaml").write_text(
        "name: ade_style\nroot: data/ADEChallengeData2016\nclass_names: [wall, building, sky]\n"
        "train_split: training\nval_split: validation\npalette: null\n"
        "source:\n  _target_: test_contributing.ade_style_samples\n  image_dir: images\n  mask_dir: annotations\n")
    return conf


def _overrides(shapes_root: Path, conf: Path, *extra: str, loss: str = "label_smoothing") -> list[str]:
    """The documented `segtrain train model=tiny_fcn backbone=resnet18 loss=...`, made seconds-long."""
    tiny = tiny_overrides(shapes_root, **{"trainer.max_iters": 12, "trainer.val_interval": 12,
                                          "trainer.ckpt_interval": 12, "optimizer.lr": 0.02})
    assert tiny[0] == "experiment=quickstart"  # the walk-through runs without an experiment
    return ["model=tiny_fcn", "backbone=resnet18", f"loss={loss}", f"hydra.searchpath=[file://{conf}]",
            *tiny[1:], *extra]


@pytest.mark.cli
def test_a_model_and_a_loss_added_as_documented_train(tmp_path, shapes_root, my_conf):
    cfg = compose_config("train", _overrides(shapes_root, my_conf))
    assert cfg.model._target_ == "test_contributing.TinyFCN"
    result = train(cfg, tmp_path / "run")
    assert isinstance(result.model, TinyFCN)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    # eval trusts the command line, not the checkpoint's config, to name code outside segtrain
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    for extra, code in (([], 2), (["model._target_=test_contributing.TinyFCN"], 0)):
        result = run_cli("eval", f"ckpt={ckpt}", *extra, f"hydra.run.dir={tmp_path / f'ev{code}'}", cwd=tmp_path,
                         env=env)
        assert result.returncode == code, result.stderr
    with pytest.raises(ConfigError, match="unknown key model.chanels for TinyFCN"):
        train(compose_config("train", _overrides(shapes_root, my_conf, "+model.chanels=4")), tmp_path / "bad")


@pytest.mark.cli
def test_segtrain_info_finds_the_added_model(tmp_path, my_conf):
    result = run_cli("info", "model=tiny_fcn", "backbone=resnet18", f"hydra.searchpath=[file://{my_conf}]",
                     "info.input_size=[64,64]", cwd=tmp_path, env={"PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr
    assert "TinyFCN + resnet18" in result.stdout


def _ade_style_tree(root: Path) -> dict[str, list[np.ndarray]]:
    """Stored masks (values 0..3) of 8 training and 2 validation images, 40x56."""
    rng = np.random.default_rng(0)
    stored: dict[str, list[np.ndarray]] = {}
    for split, count in (("training", 8), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        stored[split] = []
        for n in range(count):
            mask = np.zeros((40, 56), np.uint8)  # 0: not annotated
            mask[4:20, 4:30], mask[20:36, 10:50], mask[:, 50:] = 1, 2, 3
            mask[rng.integers(0, 40, 30), rng.integers(0, 56, 30)] = 0
            image = np.stack([mask * 60, 255 - mask * 60, rng.integers(0, 40, (40, 56))], -1).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{n:08d}.jpg", quality=95)
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{split}_{n:08d}.png")
            stored[split].append(mask)
    return stored


@pytest.mark.slow
def test_a_dataset_with_a_label_decoder_shifts_labels_and_ignores_zero(tmp_path, shapes_root, my_conf):
    root = tmp_path / "ADEChallengeData2016"
    stored = _ade_style_tree(root)
    tiny = [o for o in _overrides(shapes_root, my_conf, loss="cross_entropy") if not o.startswith("dataset.")]
    cfg = compose_config("train", [*tiny, "dataset=ade_style", f"dataset.root={root}",
                                   "dataset.augment.crop_size=[32,32]"])
    samples = ade_style_samples(str(root), "validation")
    assert len(samples) == 2 and all(s[2] is ADE_SHIFT for s in samples)
    val = build_dataset(cfg.dataset, "validation", train=False, normalize=normalization(cfg))
    for index, raw in enumerate(stored["validation"]):
        decoded = val[index]["mask"].numpy()
        assert decoded.shape == raw.shape
        assert (decoded[raw == 0] == 255).all()  # 0 is ignored
        assert np.array_equal(decoded[raw > 0], raw[raw > 0].astype(np.int64) - 1)  # 1..3 -> 0..2
    # data check reads the masks through the same decoder: class pixel counts of the shifted labels
    report = check_split(cfg, "validation", progress=False)
    raw = np.stack(stored["validation"])
    assert not report.problems and report.samples == 2
    assert report.pixels[:4].tolist() == [(raw == 1).sum(), (raw == 2).sum(), (raw == 3).sum(), 0]
    assert report.pixels[255] == (raw == 0).sum() > 0
    result = train(cfg, tmp_path / "run")
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and all(np.isfinite(losses)) and sum(losses[-3:]) < sum(losses[:3])
    assert 0.0 <= result.best_miou <= 1.0
    # A stored 255 becomes 254 (the shift applies to every value): named as out of range, not trained on.
    bad = stored["validation"][0].copy()
    bad[0, 0] = 255
    Image.fromarray(bad).save(root / "annotations" / "validation" / "ADE_validation_00000000.png")
    with pytest.raises(DataError, match=r"label values \[254\] outside the valid range 0..2"):
        build_dataset(cfg.dataset, "validation", train=False, normalize=normalization(cfg))[0]


def test_dice_loss_by_hand():
    # One image, 2 classes, four pixels labelled [0, 0, 1, ignore]; logits 0: every probability 0.5.
    # Over the three labelled pixels, class 0: overlap 1.0, sum p 1.5, sum y 2 -> (2 + 1) / (3.5 + 1) = 2/3;
    # class 1: overlap 0.5, sum p 1.5, sum y 1 -> (1 + 1) / (2.5 + 1) = 4/7. Loss 1 - (2/3 + 4/7) / 2 = 8/21.
    loss = DiceLoss(2, smooth=1.0)
    logits, target = torch.zeros(1, 2, 1, 4), torch.tensor([[[0, 0, 1, 255]]])
    assert loss({"out": logits}, target).item() == pytest.approx(8 / 21, rel=1e-6)
    # A confident, right prediction scores near 0; an image with no labelled pixel adds nothing and does not count.
    right = torch.tensor([[[[20.0, 20.0, -20.0, 0.0]], [[-20.0, -20.0, 20.0, 0.0]]]])
    assert loss({"out": right}, target).item() == pytest.approx(0.0, abs=1e-6)
    both = loss({"out": torch.cat([logits, logits])}, torch.cat([target, torch.full_like(target, 255)]))
    assert both.item() == pytest.approx(8 / 21, rel=1e-6)


@pytest.mark.slow
def test_dice_loss_is_the_same_however_the_global_batch_is_split(tmp_path, shapes_root, my_conf):
    torch.manual_seed(3)
    loss = DiceLoss(3)
    logits, target = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    target[1, :4] = 255
    whole = loss({"out": logits}, target)
    normalizer = loss.normalizer(target[:2]) + loss.normalizer(target[2:])
    parts = loss({"out": logits[:2]}, target[:2], normalizer) + loss({"out": logits[2:]}, target[2:], normalizer)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    # The trainer: one pass of 4 images or two accumulated passes of 2, the same losses and weights.
    fixed = ["trainer.max_iters=3", "trainer.val_interval=3", "trainer.freeze_bn=true"]
    big = train(compose_config("train", _overrides(shapes_root, my_conf, *fixed, loss="dice")), tmp_path / "big")
    split = train(compose_config("train", _overrides(shapes_root, my_conf, *fixed, "trainer.grad_accum_steps=2",
                                                     loss="dice")), tmp_path / "split")
    assert isinstance(big.model, TinyFCN)
    assert [h["loss"] for h in big.history] == pytest.approx([h["loss"] for h in split.history], abs=1e-6)
    assert all(0.0 < h["loss"] < 1.0 for h in big.history)
    for a, b in zip(big.model.state_dict().values(), split.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
