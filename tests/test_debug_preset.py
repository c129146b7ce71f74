"""debug=fast: a smoke run of any experiment (a few iterations, a few validation images, no image logging,
no loader workers), and trainer.val_max_images, which it sets."""

import pytest

from conftest import compose_config, run_cli, run_main, tiny_overrides
from segtrain.data.loading import build_dataset
from segtrain.errors import ConfigError

SMOKE = {"trainer.max_iters": 10, "trainer.val_interval": 10, "trainer.ckpt_interval": 10,
         "trainer.val_max_images": 8, "trainer.num_workers": 0, "eval.num_workers": 0, "logging.num_images": 0}


def _values(cfg) -> dict:
    from omegaconf import OmegaConf

    return {key: OmegaConf.select(cfg, key) for key in SMOKE}


@pytest.mark.parametrize("experiment", ["quickstart", "deeplabv3plus_r101_voc"])
def test_debug_fast_wins_over_the_experiment(experiment):
    cfg = compose_config("train", [f"experiment={experiment}", "debug=fast"])
    assert _values(cfg) == SMOKE
    assert cfg.trainer.batch_size == compose_config("train", [f"experiment={experiment}"]).trainer.batch_size


def test_the_command_line_wins_over_debug_fast():
    cfg = compose_config("train", ["experiment=quickstart", "debug=fast", "trainer.max_iters=20",
                                   "trainer.val_max_images=null"])
    assert cfg.trainer.max_iters == 20 and cfg.trainer.val_max_images is None and cfg.trainer.num_workers == 0


def test_without_debug_nothing_changes():
    cfg = compose_config("train", ["experiment=quickstart"])
    assert cfg.trainer.max_iters == 240 and cfg.trainer.val_max_images is None and cfg.logging.num_images == 4


def test_debug_is_a_training_group(capsys):
    status, _, err = run_main(capsys, "eval", "ckpt=best.pt", "debug=fast")
    assert status == 2 and "debug has no effect here" in err
    status, out, _ = run_main(capsys, "train", "--help")
    assert status == 0 and "debug: fast" in out
    status, out, _ = run_main(capsys, "eval", "--help")
    assert status == 0 and "debug:" not in out


def test_val_max_images_takes_the_first_images_and_is_at_least_one(shapes_root):
    cfg = compose_config("train", tiny_overrides(shapes_root))
    whole = build_dataset(cfg.dataset, "val", train=False, normalize=([0.5] * 3, [0.5] * 3))
    first = build_dataset(cfg.dataset, "val", train=False, normalize=([0.5] * 3, [0.5] * 3), max_samples=2)
    assert first.samples == whole.samples[:2] and len(whole) == 4
    with pytest.raises(ConfigError, match=r"trainer.val_max_images must be >= 1 \(null: the whole validation"):
        compose_config("train", tiny_overrides(shapes_root, **{"trainer.val_max_images": 0}))


@pytest.mark.cli
@pytest.mark.slow
def test_quickstart_smoke_run_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    # Smaller demo data and network than the quickstart's 700 images and ResNet-18: neither is what this test is
    # about, and on 2 CPU cores they would take most of its time.
    result = run_cli("train", "experiment=quickstart", "debug=fast", f"dataset.root={tmp_path / 'shapes'}",
                     "dataset.source.num_train=32", "dataset.source.num_val=16", "dataset.source.image_size=[64,80]",
                     "dataset.augment.crop_size=[64,64]", "backbone.out_indices=[1,2]", f"hydra.run.dir={run_dir}",
                     "logging.progress=false", cwd=tmp_path, check=True)
    log = result.stderr + result.stdout
    assert "validation on the first 8 images of split 'val' (trainer.val_max_images=8)" in log
    assert "8 val images" in log and "iter 10/10" in log and "iter 10: val mIoU" in log
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert not [p for p in (run_dir / "checkpoints").glob("iter_*.pt") if p.name != "iter_0000010.pt"]
