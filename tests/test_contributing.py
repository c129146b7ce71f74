"""CONTRIBUTING.md's walk-through, followed step by step: a model and a loss defined here (one class
each), one YAML file each in a config folder of their own, then train and `segtrain info`."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.engine.losses import CrossEntropy
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError
from segtrain.models.heads.aspp import conv_bn_relu
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


@pytest.fixture()
def my_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "loss").mkdir()
    (conf / "model" / "tiny_fcn.yaml").write_text(
        "# TinyFCN: one 3x3 conv on the deepest feature.\n_target_: test_contributing.TinyFCN\nchannels: 8\n")
    (conf / "loss" / "label_smoothing.yaml").write_text(
        "_target_: test_contributing.LabelSmoothingCrossEntropy\naux_weight: 0.4\nclass_weights: null\n"
        "smoothing: 0.1\n")
    return conf


def _overrides(shapes_root: Path, conf: Path, *extra: str) -> list[str]:
    """The documented `segtrain train model=tiny_fcn backbone=resnet18 loss=...`, made seconds-long."""
    tiny = tiny_overrides(shapes_root, **{"trainer.max_iters": 12, "trainer.val_interval": 12,
                                          "trainer.ckpt_interval": 12, "optimizer.lr": 0.02})
    assert tiny[0] == "experiment=quickstart"  # the walk-through runs without an experiment
    return ["model=tiny_fcn", "backbone=resnet18", "loss=label_smoothing", f"hydra.searchpath=[file://{conf}]",
            *tiny[1:], *extra]


@pytest.mark.cli
def test_a_model_and_a_loss_added_as_documented_train(tmp_path, shapes_root, my_conf):
    cfg = compose_config("train", _overrides(shapes_root, my_conf))
    assert cfg.model._target_ == "test_contributing.TinyFCN"
    result = train(cfg, tmp_path / "run")
    assert isinstance(result["model"], TinyFCN)
    losses = [h["loss"] for h in result["history"]]
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
