"""The Python API (segtrain.api): `segtrain.load` + `Segmenter.predict` give `segtrain predict`'s masks pixel for
pixel, `segtrain.train` returns a best checkpoint that `segtrain.evaluate` scores to the recorded mIoU, and
mistakes are the command line's one-line ConfigErrors, raised."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from PIL import Image

import segtrain
from conftest import FULL_RESNET18, checkout_env, run_cli, tiny_overrides
from segtrain.api import override_value
from segtrain.engine.checkpoint import load_checkpoint, save_checkpoint
from segtrain.errors import ConfigError, DataError, WeightsError

SIZES = ((40, 56), (33, 47), (64, 80))  # three images, three sizes (odd ones too)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_root):
    """A tiny quickstart run trained through `segtrain.train`."""
    run = tmp_path_factory.mktemp("api") / "run"
    return segtrain.train(tiny_overrides(shapes_root, **FULL_RESNET18, **{"hydra.run.dir": str(run)}))


@pytest.fixture(scope="module")
def varied_checkpoint(trained, tmp_path_factory) -> Path:
    """The trained checkpoint with a random classifier: six iterations predict background everywhere, which
    would make a pixel-for-pixel comparison say little; random class scores vary over every image."""
    state = load_checkpoint(trained.best_checkpoint)
    generator = torch.Generator().manual_seed(0)
    for key in ("model", "ema"):
        weights = state.get(key)
        if not weights:
            continue
        classifier = [name for name, t in weights.items() if t.ndim == 4 and t.shape[0] == 5][-1]
        weights[classifier] = torch.randn(weights[classifier].shape, generator=generator) * 5
    path = tmp_path_factory.mktemp("varied") / "varied.pt"
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(SIZES):
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
    return folder


def cli_masks(tmp_path: Path, ckpt: Path, folder: Path, *overrides: str) -> dict[str, np.ndarray]:
    out = tmp_path / "out"
    run_cli("predict", f"ckpt={ckpt}", f"input={folder}", f"output={out}", *overrides, cwd=tmp_path, check=True)
    return {f"image{i}": np.asarray(Image.open(out / f"image{i}.png")) for i in range(len(SIZES))}


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("protocol", [None, "flip"])
def test_predict_matches_the_command_pixel_for_pixel(tmp_path, varied_checkpoint, images, protocol):
    expected = cli_masks(tmp_path, varied_checkpoint, images, *([f"protocol={protocol}"] if protocol else []))
    segmenter = segtrain.load(varied_checkpoint, device="cpu")
    paths = sorted(images.glob("*.png"))
    for path in paths:
        mask = segmenter.predict(path, protocol=protocol)
        want = expected[path.stem]
        assert mask.shape == want.shape == Image.open(path).size[::-1] and mask.dtype == np.uint8
        assert len(np.unique(want)) > 1  # a comparison of varied masks, not of constant ones
        np.testing.assert_array_equal(mask, want)
        # The same image as a PIL image, an array and a CHW tensor (uint8, and float in [0, 1]).
        pixels = np.array(Image.open(path).convert("RGB"))  # writable, as torch.from_numpy wants
        chw = torch.from_numpy(pixels).permute(2, 0, 1)
        for given in (Image.open(path), pixels, chw, chw.float() / 255):
            np.testing.assert_array_equal(segmenter.predict(given, protocol=protocol), want)
    batch = segmenter.predict_batch(paths, protocol=protocol)
    for path, mask in zip(paths, batch):
        np.testing.assert_array_equal(mask, expected[path.stem])


@pytest.mark.slow
def test_protocols_by_name_by_mapping_and_at_load(varied_checkpoint, images):
    segmenter = segtrain.load(varied_checkpoint, device="cpu")
    path = images / "image1.png"
    assert not segmenter.settings.flip and segmenter.protocol_settings("flip").flip
    by_mapping = segmenter.predict(path, protocol={"flip": True})
    np.testing.assert_array_equal(by_mapping, segmenter.predict(path, protocol="flip"))
    loaded_with = segtrain.load(varied_checkpoint, device="cpu", overrides=["protocol=flip"])
    np.testing.assert_array_equal(loaded_with.predict(path), by_mapping)
    slide = segmenter.protocol_settings({"mode": "slide", "crop_size": [24, 24], "scales": [0.75, 1.0]})
    assert (slide.mode, slide.crop_size, slide.scales) == ("slide", (24, 24), (0.75, 1.0))
    assert segmenter.predict(path, protocol="slide_flip").shape == SIZES[1]
    colours = segmenter.colorize(by_mapping)
    assert colours.shape == (*SIZES[1], 3) and colours.dtype == np.uint8
    assert (colours[by_mapping == 2] == segmenter.palette[2]).all()
    assert segmenter.overlay(path, by_mapping, 0.5).shape == (*SIZES[1], 3)
    with pytest.raises(ConfigError, match="protocol key 'flipp': a protocol sets mode, crop_size"):
        segmenter.predict(path, protocol={"flipp": True})
    with pytest.raises(ConfigError, match=r"rebuilds the network: .*overrides=\['eval.output_stride=8'\]"):
        segmenter.predict(path, protocol={"output_stride": 8})
    with pytest.raises(ConfigError, match="did you mean protocol=flip"):
        segmenter.predict(path, protocol="flp")
    with pytest.raises(DataError, match="RGB uint8 HxWx3"):
        segmenter.predict(np.zeros((4, 4, 3), np.float32))


@pytest.mark.slow
def test_train_gives_a_best_checkpoint_evaluate_scores_the_same(trained, tmp_path):
    assert trained.best_checkpoint == trained.run_dir / "checkpoints" / "best.pt"
    assert (trained.run_dir / "train.log").is_file()  # the run directory the command would write
    # Hydra's log file handler belongs to the run: the API leaves the root logger as it found it.
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    assert not [name for name in files if name.startswith(str(trained.run_dir))]
    assert not HydraConfig.initialized()  # nor Hydra's state of a job that is over
    metrics = segtrain.evaluate(trained.best_checkpoint, [f"hydra.run.dir={tmp_path / 'eval'}"])
    assert metrics["miou"] == trained.best_miou == load_checkpoint(trained.best_checkpoint)["train_state"]["best_miou"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {**written, "run_dir": str(tmp_path / "eval")} == metrics
    # A run directory is a checkpoint too, as for `segtrain eval`.
    assert segtrain.load(trained.run_dir, device="cpu").checkpoint == trained.best_checkpoint


@pytest.mark.slow
def test_a_checkpoint_path_hydra_would_misread_is_quoted(trained, tmp_path):
    odd = tmp_path / "my run, v='2'" / "best.pt"
    odd.parent.mkdir()
    shutil.copy(trained.best_checkpoint, odd)
    assert segtrain.load(odd, device="cpu").checkpoint == odd


def test_mistakes_are_the_command_lines_one_line_config_errors(tmp_path, shapes_root):
    with pytest.raises(ConfigError) as caught:
        segtrain.train(tiny_overrides(shapes_root, **{"trainer.max_iter": 3}))
    assert str(caught.value) == "unknown config key 'trainer.max_iter'; did you mean 'trainer.max_iters'?"
    with pytest.raises(ConfigError, match=r"^model=deeplab: no option 'deeplab' in group 'model'; did you mean"):
        segtrain.train(["model=deeplab"])
    with pytest.raises(ConfigError, match="the Python API takes key=value overrides only"):
        segtrain.train(["-m", "optimizer.lr=0.1,0.2"])
    with pytest.raises(ConfigError, match="optimizer.lr has no effect here"):
        segtrain.evaluate(tmp_path / "x.pt", ["optimizer.lr=0.1"])
    with pytest.raises(WeightsError, match="checkpoint not found"):
        segtrain.load(tmp_path / "missing.pt")
    assert not list(tmp_path.iterdir())  # refused before any run directory


def test_override_values_are_written_as_hydra_reads_them():
    assert override_value("outputs/2024-01-01/run_1/best.pt") == "outputs/2024-01-01/run_1/best.pt"
    assert override_value("a b,c='d'") == "'a b,c=\\'d\\''"
    assert override_value([0.5, 1, True, None]) == "[0.5,1,true,null]"
    assert override_value("null") == "'null'"


def test_import_segtrain_stays_light():
    code = "import sys, segtrain; assert 'torch' not in sys.modules; assert callable(segtrain.load); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], env=checkout_env(), capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
