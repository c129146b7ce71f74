"""The start-up line says where the weights come from: random init, a file, ImageNet weights by tag, init_from."""

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import FULL_RESNET18, compose_config, node, tiny_overrides
from segtrain.engine.run import describe, weights_origin
from segtrain.engine.trainer import Trainer
from segtrain.models import build_backbone
from segtrain.models.backbones import drn as drn_module
from segtrain.models.backbones import timm_encoder
from segtrain.models.backbones.base import RANDOM_INIT
from segtrain.models.backbones.weights import timm_weights_tag


@pytest.fixture
def pretend_timm_download(monkeypatch):
    """pretrained=true without network: timm builds the network and the download is left out."""
    asked = []

    def build(name, pretrained, kwargs):
        if pretrained:
            asked.append(name)
        return original(name, False, kwargs)

    original = timm_encoder._features_model
    monkeypatch.setattr(timm_encoder, "require_timm_weights", lambda name: None)
    monkeypatch.setattr(timm_encoder, "_features_model", build)
    return asked


def _resnet18_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(build_backbone(node("backbone", "resnet18")).state_dict(), path)
    return path


def test_backbones_say_what_their_weights_start_from(tmp_path, pretend_timm_download):
    assert build_backbone(node("backbone", "resnet18")).weights_origin == RANDOM_INIT
    assert RANDOM_INIT == "random init: backbone.pretrained=false"
    path = _resnet18_file(tmp_path)
    # A file wins over pretrained=true, as the constructor loads it instead of downloading.
    given = build_backbone(node("backbone", "resnet18", pretrained=True, weights=str(path)))
    assert given.weights_origin == f"backbone.weights={path}" and not pretend_timm_download
    tagged = build_backbone(node("backbone", "timm", name="resnet18.tv_in1k", pretrained=True))
    assert tagged.weights_origin == "ImageNet weights resnet18.tv_in1k"
    assert pretend_timm_download == ["resnet18.tv_in1k"]


def test_an_untagged_timm_name_reports_the_tag_timm_loads():
    assert timm_weights_tag("xception65") == "xception65.ra3_in1k"
    assert timm_weights_tag("xception65.tf_in1k") == "xception65.tf_in1k"
    assert timm_weights_tag("resnet18.tv_in1k") == "resnet18.tv_in1k"


def test_drn_names_its_official_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(drn_module.DRN("drn_d_22").state_dict(), checkpoints / "scratch")
    name = f"drn_d_22-{hashlib.sha256((checkpoints / 'scratch').read_bytes()).hexdigest()[:8]}.pth"
    (checkpoints / "scratch").rename(checkpoints / name)
    monkeypatch.setitem(drn_module.WEIGHT_URLS, "drn_d_22", f"https://weights.example.invalid/{name}")
    assert drn_module.DRN("drn_d_22", pretrained=True).weights_origin == f"ImageNet weights {name}"
    assert drn_module.DRN("drn_d_22").weights_origin == RANDOM_INIT


def test_init_from_and_a_resumed_checkpoint_come_before_the_backbone():
    backbone = SimpleNamespace(weights_origin="ImageNet weights resnet18.a1_in1k")
    run = SimpleNamespace(state=SimpleNamespace(iteration=0), init_report=None,
                          model=SimpleNamespace(backbone=backbone))
    assert weights_origin(run) == "ImageNet weights resnet18.a1_in1k"
    run.init_report = SimpleNamespace(path=Path("/runs/a/checkpoints/best.pt"))
    assert weights_origin(run) == "weights from init_from=/runs/a/checkpoints/best.pt"
    run.state.iteration = 80
    assert weights_origin(run) == "weights of the resumed checkpoint at iteration 80"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["random", "file", "imagenet"])
def test_start_up_line_names_the_weights_origin(case, tmp_path, shapes_root, caplog, pretend_timm_download):
    extra = {"random": {}, "file": {"backbone.pretrained": "true", "backbone.weights": str(_resnet18_file(tmp_path))},
             "imagenet": {"backbone.pretrained": "true"}}[case]
    trainer = Trainer(compose_config("train", tiny_overrides(shapes_root, **FULL_RESNET18, **extra)), tmp_path / "run")
    try:
        run = trainer.setup()
        with caplog.at_level(logging.INFO, logger="segtrain.train"):
            describe(run)
    finally:
        trainer.close()
    expected = {"random": "(random init: backbone.pretrained=false)", "imagenet": "(ImageNet weights resnet18.a1_in1k)",
                "file": f"(backbone.weights={extra.get('backbone.weights')})"}[case]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model DeepLabV3Plus"))
    assert line.startswith(f"model DeepLabV3Plus + resnet18 {expected}: "), line
