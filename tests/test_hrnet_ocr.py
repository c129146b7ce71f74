"""model=hrnet_ocr: HRNetV2 + OCR (the official layout and outputs are tested in test_official.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config, node, run_cli, tiny_overrides
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError
from segtrain.models import build_model
from segtrain.models.hrnet_ocr import ObjectAttention, region_representations

# sum(p.numel()) of HighResolutionNet in HRNet-OCR's lib/models/seg_hrnet_ocr.py with the Cityscapes W48 config
# (19 classes, MODEL.OCR defaults), measured on the official module; the branch publishes no count.
OFFICIAL_W48_OCR_PARAMS = 70_372_678
OFFICIAL_W18_OCR_PARAMS = 12_080_818


@pytest.mark.parametrize("backbone,expected", [("hrnet_w48", OFFICIAL_W48_OCR_PARAMS),
                                               ("hrnet_w18", OFFICIAL_W18_OCR_PARAMS)])
def test_parameter_count_is_the_official_modules(backbone, expected):
    with torch.device("meta"):
        model = build_model(node("model", "hrnet_ocr"), node("backbone", backbone), 19)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_region_representations_are_softmax_weighted_means_over_the_pixels():
    # Two pixels, one feature channel (values 2 and 4), two regions.
    features = torch.tensor([2.0, 4.0]).view(1, 1, 1, 2)
    logits = torch.tensor([[0.0, 0.0], [0.0, 1e4]]).view(1, 2, 1, 2)  # region 0: even; region 1: pixel 2
    regions = region_representations(features, logits)
    assert regions.shape == (1, 1, 2, 1)  # N, C, K, 1
    torch.testing.assert_close(regions.flatten(), torch.tensor([3.0, 4.0]))


def test_pixels_attend_over_regions_with_scaled_dot_products():
    attention = ObjectAttention(channels=2, key_channels=2).eval()
    # Identity transforms: 1x1 convs as identities, BN at running mean 0 / var 1 - eps.
    with torch.no_grad():
        for module in attention.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.fill_(1 - module.eps)
    pixels = torch.tensor([[3.0], [0.0]]).view(1, 2, 1, 1)  # one pixel (3, 0)
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 2, 1)  # region a = (1, 0), b = (0, 1)
    similarity = torch.tensor([3.0, 0.0]) * 2 ** -0.5  # query . key, scaled by key_channels^-1/2
    weights = similarity.softmax(0)
    expected = weights[0] * torch.tensor([1.0, 0.0]) + weights[1] * torch.tensor([0.0, 1.0])
    with torch.no_grad():
        got = attention(pixels, regions)
    torch.testing.assert_close(got.flatten(), expected)


def test_returns_aux_regions_in_training_only_and_logits_at_the_input_size():
    torch.manual_seed(0)
    model = build_model(node("model", "hrnet_ocr", mid_channels=16, key_channels=8), node("backbone", "hrnet_w18"), 5)
    assert model.auxiliary_outputs() == ("aux",)
    x = torch.randn(2, 3, 40, 56)
    outputs = model.train()(x)
    assert set(outputs) == {"out", "aux"} and all(v.shape == (2, 5, 40, 56) for v in outputs.values())
    with torch.no_grad():
        assert set(model.eval()(x)) == {"out"}


@pytest.mark.parametrize("extra,backbone,match", [
    ({"mid_channels": 0}, "hrnet_w18", "model.mid_channels=0"),
    ({"dropout": 1.5}, "hrnet_w18", "model.dropout"),
])
def test_bad_options_name_the_key(extra, backbone, match):
    with pytest.raises(ConfigError, match=match):
        build_model(node("model", "hrnet_ocr", **extra), node("backbone", backbone), 3)


def test_fuse_align_corners_sets_the_fuse_layers_and_needs_bilinear():
    from timm.models.hrnet import HighResolutionModule

    backbone = build_model(node("model", "hrnet_ocr"), node("backbone", "hrnet_w18", fuse_align_corners=True),
                           3).backbone
    ups = [part for module in backbone.net.modules() if isinstance(module, HighResolutionModule)
           for path in module.fuse_layers for layer in path if isinstance(layer, torch.nn.Sequential)
           for part in layer if isinstance(part, torch.nn.Upsample)]
    assert ups and all(u.mode == "bilinear" and u.align_corners for u in ups)
    with pytest.raises(ConfigError, match="backbone.fuse_align_corners"):
        build_model(node("model", "hrnet_ocr"),
                    node("backbone", "hrnet_w18", fuse_upsample="nearest", fuse_align_corners=True), 3)


def test_cityscapes_experiment_has_the_official_recipe():
    cfg = compose_config("train", ["experiment=hrnetv2_w48_ocr_cityscapes"])
    assert cfg.model._target_ == "segtrain.models.hrnet_ocr.HRNetOCR" and cfg.backbone.name == "hrnet_w48"
    assert (cfg.model.mid_channels, cfg.model.key_channels, cfg.model.dropout) == (512, 256, 0.05)
    assert cfg.model.align_corners and cfg.backbone.fuse_align_corners and cfg.model.bn_momentum is None
    assert cfg.loss._target_ == "segtrain.losses.CrossEntropy" and cfg.loss.aux_weight == 0.4
    assert list(cfg.dataset.augment.crop_size) == [512, 1024] and cfg.trainer.batch_size == 12
    assert (cfg.trainer.max_iters, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (120000, 0.01, 5e-4)
    assert cfg.eval.mode == "whole" and list(cfg.eval.scales) == [1.0] and not cfg.eval.flip



def test_ade20k_experiment_has_the_official_recipe():
    cfg = compose_config("train", ["experiment=hrnetv2_w48_ocr_ade20k"])
    assert cfg.model._target_ == "segtrain.models.hrnet_ocr.HRNetOCR" and cfg.backbone.name == "hrnet_w48"
    assert cfg.dataset.name == "ade20k" and len(cfg.dataset.class_names) == 150
    assert cfg.model.align_corners and cfg.backbone.fuse_align_corners and cfg.model.bn_momentum is None
    assert cfg.loss._target_ == "segtrain.losses.OhemCrossEntropy" and cfg.loss.aux_weight == 0.4
    assert (cfg.loss.threshold, cfg.loss.min_kept) == (0.9, 131072)  # OHEMTHRES, OHEMKEEP
    assert list(cfg.dataset.augment.crop_size) == [520, 520] and cfg.trainer.batch_size == 16
    assert list(cfg.dataset.augment.scale_range) == [0.5, 2.1] and cfg.dataset.augment.scale_step == 0.1
    assert cfg.trainer.max_iters == 120 * (20210 // 16)  # END_EPOCH 120, epoch_iters int(20210 / 16)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.schedule.power) == (0.02, 1e-4, 0.9)
    assert cfg.eval.mode == "slide" and list(cfg.eval.crop_size) == [520, 520] and list(cfg.eval.stride) == [346, 346]
    assert list(cfg.eval.scales) == [1.0] and not cfg.eval.flip
    multi = compose_config("train", ["experiment=hrnetv2_w48_ocr_ade20k", "protocol=hrnet_slide520_ms_flip"]).eval
    assert list(multi.scales) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0] and multi.flip


@pytest.mark.slow
def test_trains_two_iterations_with_the_aux_loss(tmp_path):
    # Its own data folder: 64x64 images (segtrain never regenerates the shared one with other settings).
    cfg = compose_config("train", tiny_overrides(tmp_path / "shapes", **{
        "model": "hrnet_ocr", "backbone": "hrnet_w18", "model.mid_channels": 16, "model.key_channels": 8,
        "trainer.max_iters": 2, "trainer.val_interval": 2, "trainer.ckpt_interval": 2,
        "dataset.augment.crop_size": "[64,64]", "dataset.source.image_size": "[64,64]"})
        + [f"~model.{key}" for key in ("aspp_channels", "decoder_channels", "low_level_channels")])
    result = train(cfg, tmp_path / "run")
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result.history)


@pytest.mark.cli
def test_info_reports_the_parameter_count(tmp_path):
    result = run_cli("info", "experiment=hrnetv2_w48_ocr_cityscapes", "info.input_size=[64,128]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HRNetOCR + hrnet_w48" in result.stdout and "70.37M total" in result.stdout
