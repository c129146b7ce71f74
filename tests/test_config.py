from pathlib import Path

import pytest

from conftest import compose_config
from segtrain.cli import config_dir

GROUPS = ["model", "backbone", "dataset", "optimizer", "schedule", "experiment"]


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
    cfg = compose_config(command, [f"{group}={option}"] + (["ckpt=x.pt"] if command == "eval" else []))
    assert cfg.trainer.max_iters >= 1
    if group in ("model", "backbone"):
        assert cfg[group]["_target_"].startswith("segtrain.")
    if group == "dataset":
        assert cfg.dataset.name == option


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
