"""eval, predict, export and info take the checkpoint's config: `--cfg job` shows it, `info ckpt=`
reports its model, and a network override is one line naming what the checkpoint was trained with."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import compose_config, run_cli, run_main, tiny_overrides, write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A quickstart DeepLab v3+ / ResNet-18 checkpoint with random weights, written the trainer's way."""
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = compose_config("train", tiny_overrides(folder / "shapes"))
    return write_random_checkpoint(cfg, folder / "best.pt")


def test_eval_cfg_job_prints_the_checkpoints_config_with_the_overrides(tmp_path, monkeypatch, capsys, checkpoint):
    monkeypatch.chdir(tmp_path)  # --cfg job ends before Hydra runs anything: segtrain.cli.main in-process
    status, out, err = run_main(capsys, "eval", f"ckpt={checkpoint}", "eval.flip=true", "--cfg", "job")
    assert status == 0, err
    shown = yaml.safe_load(out)
    assert shown["backbone"]["name"] == "resnet18"  # the checkpoint's; the eval default is resnet101
    assert shown["model"]["aspp_channels"] == 64 and shown["dataset"]["source"]["num_train"] == 16
    assert shown["eval"]["flip"] is True and shown["ckpt"] == str(checkpoint)
    status, out, _ = run_main(capsys, "export", f"ckpt={checkpoint}", "--cfg", "job", "-p", "backbone")
    assert status == 0 and "name: resnet18" in out
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override", ["model=pspnet", "backbone=resnet50"])
def test_a_network_override_against_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys, checkpoint, override):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, "eval", f"ckpt={checkpoint}", override)
    assert status == 2
    assert err.strip().count("\n") == 0, err
    group = override.split("=")[0]
    assert f"{override}: {checkpoint}" in err and f"drop {group}=" in err, err
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run directory


def test_a_layer_changing_model_key_is_one_line(checkpoint):
    from segtrain.engine.restore import load_for_inference
    from segtrain.errors import WeightsError

    overrides = [f"ckpt={checkpoint}", "model.aspp_channels=32", "trainer.device=cpu"]
    with pytest.raises(WeightsError, match=r"do not fit the network built with model.aspp_channels \(trained: model "
                                           r"DeepLabV3Plus \+ backbone resnet18\): size mismatch"):
        load_for_inference(compose_config("eval", overrides), overrides)


@pytest.mark.cli
def test_info_reports_the_checkpoints_model(tmp_path, checkpoint):
    result = run_cli("info", f"ckpt={checkpoint}", "info.input_size=[64,64]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"checkpoint  {checkpoint} (iteration 6, best val mIoU 25.00%)" in result.stdout
    assert "DeepLabV3Plus + resnet18 (5 classes, dataset shapes)" in result.stdout and "64x64" in result.stdout


@pytest.mark.cli
def test_predict_writes_into_its_run_directory_by_default(tmp_path, checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "a.jpg")
    result = run_cli("predict", f"ckpt={checkpoint}", f"input={folder}", "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "outputs").glob("*/*-predict")
    assert sorted(p.name for p in run.glob("*.png")) == ["a.png", "a_color.png", "a_overlay.png"]
    assert f"segmented 1 image(s) into {run.resolve()}" in result.stdout


def test_training_commands_own_keys_in_a_stored_config_are_left_out(checkpoint):
    from segtrain.engine.restore import checkpoint_config

    state = torch.load(checkpoint, weights_only=True)
    stored = yaml.safe_load(state["config"])
    state["config"] = yaml.safe_dump({**stored, "resume": "auto", "init_from": "other.pt"})
    overrides = [f"ckpt={checkpoint}"]
    cfg = checkpoint_config(state, compose_config("eval", overrides), overrides)
    assert "init_from" not in cfg and "resume" not in cfg and cfg.backbone.name == "resnet18"
