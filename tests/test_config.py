from pathlib import Path

import pytest
import torch

from conftest import compose_config
from segtrain.cli import config_dir
from segtrain.config_checks import amp_mode, sync_bn_mode
from segtrain.engine.optim import build_optimizer
from segtrain.engine.step import build_loss, build_lr_schedule
from segtrain.errors import ConfigError
from segtrain.losses import SegmentationLoss

GROUPS = ["model", "backbone", "dataset", "loss", "optimizer", "schedule", "experiment"]
PRIMARY = ["train", "eval", "predict", "export", "info", "bench", "data_check"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert _options(group)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_option_composes(command, group, option):
    # dataset=folder has no default class names (your data's classes): they are given, as a user must.
    names = ["dataset.class_names=[a,b]"] if (group, option) == ("dataset", "folder") else []
    cfg = compose_config(command, [f"{group}={option}", *names] + (["ckpt=x.pt"] if command == "eval" else []))
    assert cfg.trainer.max_iters >= 1
    if group in ("model", "backbone"):
        assert cfg[group]["_target_"].startswith("segtrain.")
    if group == "dataset":
        assert cfg.dataset.name == option
    if group == "loss":
        assert isinstance(build_loss(cfg, len(cfg.dataset.class_names), 255), SegmentationLoss)
    if group == "schedule":
        assert build_lr_schedule(cfg)(0) > 0
    if group == "optimizer":
        model = torch.nn.Linear(2, 2)
        model.backbone_parameters, model.head_parameters = lambda: [model.weight], lambda: [model.bias]
        assert isinstance(build_optimizer(cfg.optimizer, model), torch.optim.Optimizer)


@pytest.mark.parametrize("command", PRIMARY)
def test_primary_configs_share_the_groups_from_common(command):
    extra = ["ckpt=x.pt"] if command in ("eval", "predict", "export") else []
    cfg = compose_config(command, extra)
    for group in ("model", "backbone", "dataset", "loss", "optimizer", "schedule"):
        assert cfg[group] is not None, group
    assert cfg.loss._target_ == "segtrain.losses.CrossEntropy"


@pytest.mark.parametrize("value,expected", [(False, "off"), ("off", "off"), ("OFF", "off"), ("bf16", "bf16")])
def test_amp_accepts_yamls_boolean_off(value, expected):
    assert amp_mode(value) == expected


def test_option_checks_name_the_key():
    with pytest.raises(ConfigError, match="trainer.sync_bn must be one of auto, true, false, got 'sometimes'"):
        compose_config("train", ["trainer.sync_bn=sometimes"])
    assert sync_bn_mode(True) == "true" and sync_bn_mode("False") == "false"
    for device in ("auto", "cpu", "cuda", "cuda:3"):
        assert compose_config("train", [f"trainer.device={device}"]).trainer.device == device
    with pytest.raises(ConfigError, match="trainer.device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"):
        compose_config("train", ["trainer.device=cuda:x"])


@pytest.mark.parametrize("command", PRIMARY)
def test_yaml_booleans_become_the_options_canonical_words(command):
    extra = ["ckpt=x.pt"] if command in ("eval", "predict", "export") else []
    trainer = compose_config(command, [*extra, "trainer.amp=off", "trainer.sync_bn=True",
                                       "trainer.channels_last=false"]).trainer
    assert (trainer.amp, trainer.sync_bn, trainer.channels_last) == ("off", "true", "false")


@pytest.mark.parametrize("override,message", [
    ("optimizer.momentum=1.5", "optimizer.momentum must be in [0, 1) (e.g. 0.9), got 1.5"),
    ("optimizer.momentum=1", "optimizer.momentum must be in [0, 1) (e.g. 0.9), got 1"),
    ("optimizer.head_lr_mult=-1", "optimizer.head_lr_mult must be >= 0, got -1"),
    ("schedule.warmup_iters=-5", "schedule.warmup_iters must be >= 0 (0: no warmup), got -5"),
    ("schedule.min_lr=0.5", "schedule.min_lr must be in [0, optimizer.lr=0.007], got 0.5"),
    ("logging.interval=0", "logging.interval must be >= 1, got 0"),
    ("eval.num_workers=-1", "eval.num_workers must be >= 0, got -1"),
])
def test_values_out_of_range_fail_at_composition_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        compose_config("train", [override])


def test_bench_values_fail_at_composition():
    with pytest.raises(ConfigError, match="bench.batch_size must be >= 2"):
        compose_config("bench", ["bench.batch_size=1"])


def test_experiment_overrides_groups_and_values():
    cfg = compose_config("train", ["experiment=quickstart"])
    assert cfg.backbone.name == "resnet18"
    assert cfg.trainer.batch_size == 8


def test_unknown_key_is_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["trainer.max_iter=5"])


def test_configs_ship_with_the_package():
    assert (config_dir() / "train.yaml").is_file() and (config_dir() / "eval.yaml").is_file()
    assert Path(config_dir()).name == "conf"


@pytest.mark.slow
def test_speed_defaults_resolve_per_device_and_explicit_values_win(tmp_path, shapes_root, caplog):
    from conftest import tiny_overrides
    from segtrain.engine.runtime import resolve_amp, resolve_channels_last
    from segtrain.engine.trainer import train

    cpu = torch.device("cpu")
    assert compose_config("train", []).trainer.amp == "auto"
    assert resolve_amp("auto", cpu) == "off" and resolve_channels_last("auto", cpu) is False
    assert resolve_amp("bf16", cpu) == "bf16" and resolve_channels_last("true", cpu) is True
    assert resolve_amp("off", cpu) == "off" and resolve_channels_last("false", cpu) is False
    with caplog.at_level("INFO"):
        train(compose_config("train", tiny_overrides(shapes_root, **{"trainer.max_iters": 1,
                                                                     "trainer.val_interval": 1})), tmp_path)
    assert "device cpu, amp off, channels_last False, compile off" in caplog.text


def test_xception_is_an_alias_of_xception65():
    alias, original = (compose_config("train", [f"backbone={name}"]).backbone for name in ("xception", "xception65"))
    assert alias == original and alias.name == "xception65.tf_in1k"  # DeepLab's TF ImageNet weights
