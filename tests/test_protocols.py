"""Evaluation protocols (conf/protocol/): one name fills the eval section, for eval, predict and training."""

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FULL_RESNET18, compose_config, run_cli, tiny_overrides
from segtrain.cli import config_dir
from segtrain.engine.restore import PROTOCOL_KEYS, load_for_inference
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError
from segtrain.models import backbone_for_inference

PROTOCOLS = sorted(p.stem for p in (Path(config_dir()) / "protocol").glob("*.yaml"))


@pytest.mark.parametrize("name", PROTOCOLS)
def test_a_protocol_sets_every_protocol_key_of_eval(name):
    path = Path(config_dir()) / "protocol" / f"{name}.yaml"
    assert path.read_text().startswith("# @package eval")
    values = OmegaConf.load(path)
    assert set(values) == set(PROTOCOL_KEYS)
    cfg = compose_config("train", [f"protocol={name}"])
    assert {key: cfg.eval[key] for key in PROTOCOL_KEYS} == {key: values[key] for key in PROTOCOL_KEYS}


def test_the_deeplab_protocol_is_os8_multiscale_flip():
    cfg = compose_config("eval", ["ckpt=x.pt", "protocol=deeplab_os8_ms_flip", "eval.flip=false"])
    assert list(cfg.eval.scales) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg.eval.output_stride == 8
    assert cfg.eval.flip is False  # a key given with the protocol wins


@pytest.fixture(scope="module")
def os8_run(tmp_path_factory, shapes_root):
    """A tiny run whose validation follows deeplab_os8_ms_flip (a copy of the network at output stride 8)."""
    run = tmp_path_factory.mktemp("os8")
    logger = logging.getLogger("segtrain")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        overrides = tiny_overrides(shapes_root, **FULL_RESNET18, **{"trainer.max_iters": 3})
        result = train(compose_config("train", [*overrides, "protocol=deeplab_os8_ms_flip"]), run)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run, result, records


@pytest.mark.slow
def test_training_validates_at_the_protocols_output_stride(os8_run):
    run, result, records = os8_run
    assert "validation at output stride 8 (training at 16)" in records
    assert result.best_miou >= 0 and (run / "checkpoints" / "best.pt").is_file()
    assert result.model.backbone.strides[-1] == 16  # the trained network itself stays at 16


def test_eval_rebuilds_the_checkpoint_at_the_protocols_output_stride(os8_run):
    ckpt = os8_run[0] / "checkpoints" / "best.pt"
    overrides = [f"ckpt={ckpt}", "protocol=deeplab_os8_ms_flip"]
    loaded = load_for_inference(compose_config("eval", overrides), overrides)
    assert loaded.model.backbone.strides[-1] == 8
    assert [b[0].dilation[0] for b in loaded.model.aspp.branches[1:4]] == [12, 24, 36]
    whole = [f"ckpt={ckpt}", "protocol=whole"]  # replaces the protocol stored in the checkpoint
    loaded = load_for_inference(compose_config("eval", whole), whole)
    assert loaded.model.backbone.strides[-1] == 16 and loaded.cfg.eval.flip is False


@pytest.mark.cli
def test_cli_eval_with_the_deeplab_protocol_on_the_shapes_checkpoint(os8_run, tmp_path):
    ckpt = os8_run[0] / "checkpoints" / "best.pt"
    result = run_cli("eval", f"ckpt={ckpt}", "protocol=deeplab_os8_ms_flip", f"hydra.run.dir={tmp_path / 'ev'}",
                     "trainer.device=cpu", "eval.num_workers=0", "logging.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    protocol = {key: metrics["protocol"][key] for key in ("mode", "scales", "flip", "output_stride")}
    assert protocol == {"mode": "whole", "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True, "output_stride": 8}
    assert 0.0 <= metrics["miou"] <= 1.0


def test_an_output_stride_protocol_on_a_backbone_without_one_is_one_line():
    with pytest.raises(ConfigError, match="eval.output_stride: backbone 'dla34' has no output_stride"):
        backbone_for_inference(OmegaConf.create({"name": "dla34", "output_stride": None}), 8)
