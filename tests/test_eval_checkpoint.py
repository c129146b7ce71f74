"""`ckpt=` takes a run directory (best.pt, else the newest checkpoint, saying which), and eval compares with
the checkpoint's recorded val mIoU only when it evaluates the images that mIoU was measured on."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import segtrain
from conftest import compose_config, fit_recording_start, run_cli, run_main, tiny_overrides
from segtrain.commands.eval import recorded_miou_note
from segtrain.engine.checkpoint import inference_checkpoint
from segtrain.engine.restore import load_for_inference
from segtrain.errors import WeightsError
from segtrain.models import build_model


def _files(run: Path, *names: str) -> Path:
    (run / "checkpoints").mkdir(parents=True)
    for name in names:
        (run / "checkpoints" / name).write_bytes(b"")
    return run


def test_a_file_is_taken_as_it_is(tmp_path):
    assert inference_checkpoint(tmp_path / "x.pt") == tmp_path / "x.pt"
    assert inference_checkpoint(str(tmp_path / "missing.pt")) == tmp_path / "missing.pt"  # load_checkpoint names it


def test_a_run_directory_stands_for_its_best_pt(tmp_path, caplog):
    run = _files(tmp_path / "run", "best.pt", "iter_0000006.pt", "last.pt")
    with caplog.at_level(logging.INFO, logger="segtrain"):
        assert inference_checkpoint(run) == run / "checkpoints" / "best.pt"
    assert f"ckpt={run} is a run directory: using {run / 'checkpoints' / 'best.pt'} (its best validation mIoU)" \
        in caplog.text
    assert inference_checkpoint(run / "checkpoints") == run / "checkpoints" / "best.pt"


def test_without_best_pt_the_newest_complete_checkpoint(tmp_path, caplog):
    run = _files(tmp_path / "run", "iter_0000003.pt", "iter_0000012.pt", "last.pt", ".iter_0000015.pt.a1b2.tmp")
    with caplog.at_level(logging.INFO, logger="segtrain"):
        assert inference_checkpoint(run) == run / "checkpoints" / "iter_0000012.pt"
    assert "(no best.pt: the newest checkpoint)" in caplog.text
    assert (run / "checkpoints" / ".iter_0000015.pt.a1b2.tmp").exists()  # another process may be writing it
    only_last = _files(tmp_path / "other", "last.pt")
    assert inference_checkpoint(only_last) == only_last / "checkpoints" / "last.pt"


def test_a_directory_without_checkpoints_is_one_line(tmp_path):
    with pytest.raises(WeightsError, match=r"ckpt=.*: no checkpoint in this directory \(no best.pt, iter_\*.pt or "
                                           r"last.pt in .*checkpoints\); give a checkpoint file or a training run's"):
        inference_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding a quickstart checkpoint (random weights) as checkpoints/best.pt."""
    run = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", tiny_overrides(run / "shapes"))
    model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
    (run / "checkpoints").mkdir()
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True),
                "train_state": {"iteration": 6, "best_miou": 0.25}, "class_names": list(cfg.dataset.class_names)},
               run / "checkpoints" / "best.pt")
    return run


def test_inference_loads_the_run_directorys_best_pt(run_dir):
    overrides = [f"ckpt={run_dir}", "trainer.device=cpu"]
    loaded = load_for_inference(compose_config("eval", overrides), overrides)
    assert loaded.path == run_dir / "checkpoints" / "best.pt" and loaded.cfg.backbone.name == "resnet18"


def test_cfg_job_with_a_run_directory(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(capsys, "eval", f"ckpt={run_dir}", "--cfg", "job", "-p", "backbone")
    assert status == 0 and "name: resnet18" in out, err


SAME = {"count": 4, "sha256": "a" * 64}


@pytest.mark.parametrize("saved,expected", [
    (SAME, " (the checkpoint's recorded val mIoU 25.00%, on the same images)"),
    ({"count": 100, "sha256": "b" * 64}, " (not compared with the checkpoint's recorded val mIoU 25.00%: that was "
                                         "measured on other images, 100 validation images with fingerprint "
                                         "bbbbbbbbbbbb, here 4 with aaaaaaaaaaaa)"),
    (None, " (not compared with the checkpoint's recorded val mIoU 25.00%: the checkpoint does not record which "
           "images it was validated on)"),
])
def test_the_recorded_miou_is_compared_only_on_the_same_images(saved, expected):
    state = {"train_state": {"best_miou": 0.25}, **({"val_data_fingerprint": saved} if saved else {})}
    assert recorded_miou_note(state, SAME) == expected
    assert recorded_miou_note({"train_state": {"best_miou": -1.0}, "val_data_fingerprint": SAME}, SAME) == ""


@pytest.mark.cli
@pytest.mark.slow
def test_eval_of_a_run_directory_on_its_own_and_on_other_data(tmp_path, capsys):
    data = tmp_path / "shapes"
    cfg = compose_config("train", tiny_overrides(data, **{"trainer.max_iters": 3, "trainer.val_interval": 3}))
    fit_recording_start(cfg, tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["val_data_fingerprint"]["count"] == 4
    result = run_cli("eval", f"ckpt={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'ev1'}", cwd=tmp_path, check=True)
    assert f"using {best} (its best validation mIoU)" in result.stdout  # Hydra logs to stdout
    assert "(the checkpoint's recorded val mIoU" in result.stdout and ", on the same images)" in result.stdout
    # The same files under another root are the same images; other validation images are not. (The same
    # evaluation through the Python API, which prints the same summary.)
    shutil.copytree(data, tmp_path / "moved")
    capsys.readouterr()
    segtrain.evaluate(tmp_path / "run", [f"dataset.root={tmp_path / 'moved'}", f"hydra.run.dir={tmp_path / 'ev2'}"])
    assert ", on the same images)" in capsys.readouterr().out
    segtrain.evaluate(tmp_path / "run", [f"dataset.root={tmp_path / 'other'}", "dataset.source.num_val=3",
                                         f"hydra.run.dir={tmp_path / 'ev3'}"])
    out = capsys.readouterr().out
    assert "(not compared with the checkpoint's recorded val mIoU" in out
    assert "measured on other images, 4 validation images" in out and "here 3 with" in out
