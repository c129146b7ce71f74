"""Evaluation at scale: an ETA where no bar is drawn, and `torchrun -m segtrain eval` sharding the images
over the processes with the confusion matrix of one process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

import segtrain
from conftest import CLI_TIMEOUT_S, checkout_env, compose_config, tiny_overrides
from segtrain.engine import evaluate as evaluate_module
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.models import build_model


class _Constant(nn.Module):
    """Scores class 1 everywhere."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        scores[:, 1] = 1.0
        return {"out": scores}


def _samples(sizes: list[tuple[int, int]]) -> list[dict]:
    return [{"image": torch.zeros(3, h, w), "mask": torch.ones(h, w, dtype=torch.long), "index": i}
            for i, (h, w) in enumerate(sizes)]


def test_without_a_bar_eval_logs_progress_with_an_eta(monkeypatch, caplog):
    monkeypatch.setattr(evaluate_module, "ETA_LOG_SECONDS", 0.0)
    sizes = [(8, 12), (10, 6), (7, 9), (8, 12)]  # varying sizes, each image its own pass
    loader = DataLoader(_samples(sizes), batch_size=1, collate_fn=list)
    settings = InferenceSettings(scales=(0.5, 1.0, 1.5), flip=True)
    with caplog.at_level(logging.INFO, logger="segtrain.eval"):
        result = evaluate(_Constant(), loader, 2, torch.device("cpu"), settings=settings, progress=True)
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert lines[0].startswith("eval: 1/4 images") and lines[-1].startswith("eval: 4/4 images, ")
    assert lines[-1].endswith("ETA 0:00:00")
    assert int(result.matrix[1, 1]) == sum(h * w for h, w in sizes)


def test_no_eta_lines_when_progress_is_off(monkeypatch, caplog):
    monkeypatch.setattr(evaluate_module, "ETA_LOG_SECONDS", 0.0)
    loader = DataLoader(_samples([(4, 4)] * 2), batch_size=2, collate_fn=list)
    with caplog.at_level(logging.INFO, logger="segtrain.eval"):
        evaluate(_Constant(), loader, 2, torch.device("cpu"), progress=False)
    assert not [r for r in caplog.records if "ETA" in r.getMessage()]


def _checkpoint(root: Path) -> Path:
    cfg = compose_config("train", tiny_overrides(root / "shapes", **{"dataset.source.num_val": 7}))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
    path = root / "model.pt"
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True),
                "train_state": {"iteration": 6}, "class_names": list(cfg.dataset.class_names)}, path)
    return path


@pytest.mark.slow
@pytest.mark.cli
def test_torchrun_eval_shards_the_images_and_sums_the_matrix_of_one_process(tmp_path):
    ckpt = _checkpoint(tmp_path)
    protocol = ["eval.scales=[0.75,1.0,1.25]", "eval.flip=true", "trainer.device=cpu"]
    segtrain.evaluate(ckpt, [*protocol, f"hydra.run.dir={tmp_path / 'one'}"])  # one process: this one
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "segtrain", "eval",
         f"ckpt={ckpt}", *protocol, "eval.save_predictions=true", f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=tmp_path, env=checkout_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-3000:]
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two_metrics["processes"] == 2 and one_metrics["processes"] == 1
    assert two_metrics["confusion_matrix"] == one_metrics["confusion_matrix"]
    assert sum(map(sum, one_metrics["confusion_matrix"])) > 0
    assert two_metrics["num_images"] == 7 and two_metrics["miou"] == one_metrics["miou"]
    # Rank 0 writes the results once; each shard's predictions land in rank 0's directory.
    assert len(list((tmp_path / "two" / "predictions").glob("*.png"))) == 7
    # (the dot files: the data generation's lock beside the shapes folder)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["model.pt", "one", "shapes",
                                                                                        "two"]
    assert two.stdout.count("metrics.json, per_class_iou.csv and confusion_matrix.png") == 1  # rank 0 alone
