"""Input normalisation: the backbone's weights' mean/std unless dataset.mean/std say otherwise."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_config
from segtrain.cli import config_dir
from segtrain.data.loading import build_dataset
from segtrain.data.normalization import normalization, normalize_images
from segtrain.engine.resume import check_same_normalization
from segtrain.errors import ConfigError
from segtrain.models import build_model

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TIMM_TARGET = "segtrain.models.backbones.timm_encoder.TimmBackbone"


def _backbone_files() -> list[Path]:
    """Every backbone file but timm.yaml (null: timm's) and aliases (`defaults:` to another file)."""
    files = (Path(config_dir()) / "backbone").glob("*.yaml")
    return sorted(p for p in files if p.stem != "timm" and "defaults" not in OmegaConf.load(p))


@pytest.mark.parametrize("path", _backbone_files(), ids=lambda p: p.stem)
def test_every_backbone_config_carries_the_statistics_of_its_weights(path):
    import timm

    node = OmegaConf.load(path)
    assert "mean" in node and "std" in node, f"{path.name} must declare mean/std"
    if node._target_ == TIMM_TARGET:
        declared = timm.get_pretrained_cfg(node.name)
        assert list(node.mean) == pytest.approx(declared.mean) and list(node.std) == pytest.approx(declared.std)
    else:  # DRN: trained on ImageNet with ImageNet statistics (fyu/drn classify.py)
        assert (list(node.mean), list(node.std)) == IMAGENET


def test_xception65_experiment_uses_the_tf_weights_and_half_statistics():
    cfg = compose_config("train", ["experiment=deeplabv3plus_xception65_voc"])
    assert cfg.backbone.name == "xception65.tf_in1k"
    assert normalization(compose_config("train", ["backbone=xception"])) == ([0.5] * 3, [0.5] * 3)  # the alias
    assert cfg.dataset.mean is None and cfg.dataset.std is None  # null: the backbone's
    assert normalization(cfg) == ([0.5] * 3, [0.5] * 3)


def test_dataset_statistics_override_the_backbone_and_timm_fills_nulls():
    cfg = compose_config("train", ["experiment=deeplabv3plus_xception65_voc", "dataset.mean=[0.4,0.4,0.4]"])
    assert normalization(cfg) == ([0.4] * 3, [0.5] * 3)
    generic = compose_config("train", ["backbone=timm", "backbone.name=xception65.tf_in1k"])
    assert generic.backbone.mean is None and normalization(generic) == ([0.5] * 3, [0.5] * 3)
    with pytest.raises(ConfigError, match="dataset.std"):
        normalization(compose_config("train", ["dataset.std=[0.2,0,0.2]"]))


def test_the_tensor_reaching_the_xception65_backbone_lies_in_minus_one_to_one(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = 255  # the extreme pixel values: 0 -> -1, 255 -> +1
    for n in range(2):
        Image.fromarray(image).save(root / "images" / f"{n}.png")
        Image.fromarray(np.zeros((48, 64), np.uint8), mode="L").save(root / "masks" / f"{n}.png")
    cfg = compose_config("train", ["experiment=deeplabv3plus_xception65_voc", "backbone.pretrained=false",
                                   "dataset=folder", f"dataset.root={root}", "dataset.class_names=[a,b]",
                                   "dataset.source.val_ratio=0.5", "dataset.augment.crop_size=[64,64]"])
    dataset = build_dataset(cfg.dataset, "train", train=True, normalize=normalization(cfg))
    batch = torch.stack([dataset[(0, seed)]["image"] for seed in range(4)])  # uint8: normalised as the step does
    batch = normalize_images(batch, *dataset.normalization)
    model = build_model(cfg.model, cfg.backbone, 2).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(batch)
    assert len(seen) == 1 and seen[0].min() >= -1.0 and seen[0].max() <= 1.0
    assert seen[0].min() == -1.0 and seen[0].max() == 1.0


def test_backbone_statistics_left_out_resolve_like_null_ones():
    cfg = compose_config("train", ["experiment=deeplabv3plus_xception65_voc"])
    absent = OmegaConf.create(OmegaConf.to_container(cfg))
    absent.backbone.pop("mean")
    absent.backbone.pop("std")
    assert normalization(absent) == ([0.5] * 3, [0.5] * 3)  # timm's pretrained_cfg for xception65.tf_in1k
    drn = OmegaConf.create(OmegaConf.to_container(compose_config("train", ["backbone=drn_d_22"])))
    drn.backbone.pop("mean")
    drn.backbone.pop("std")
    with pytest.raises(ConfigError, match=r"^backbone.mean/std are null or unset, which only a timm backbone"):
        normalization(drn)
    drn.dataset.mean, drn.dataset.std = IMAGENET
    assert normalization(drn) == IMAGENET


def test_resume_refuses_a_different_normalisation():
    cfg = compose_config("train", ["experiment=deeplabv3plus_xception65_voc"])
    imagenet = OmegaConf.create(OmegaConf.to_container(cfg))
    imagenet.backbone.mean, imagenet.backbone.std = IMAGENET
    with pytest.raises(ConfigError, match=r"dataset.mean=\[0.485, 0.456, 0.406\]"):
        check_same_normalization(imagenet, cfg, "last.pt")
    check_same_normalization(cfg, cfg, "last.pt")
