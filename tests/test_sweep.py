"""Sweep job names and summaries (segtrain.sweep), without running jobs."""

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import run_cli, tiny_overrides
from segtrain.engine.sweep import write_result
from segtrain.sweep import SWEPT_KEYS_ENV, collect, subdir_name, swept_keys_of, write_summary


def test_a_job_is_named_by_its_swept_overrides_only(monkeypatch):
    monkeypatch.setenv(SWEPT_KEYS_ENV, json.dumps(["optimizer.lr", "model"]))
    overrides = ["dataset.root=/data/shapes", "model=pspnet", "optimizer.lr=0.01", "trainer.max_iters=6"]
    assert subdir_name(3, overrides) == "3_model-pspnet+optimizer.lr-0.01"
    assert subdir_name(3, overrides, exclude={"model"}) == "3_optimizer.lr-0.01"
    assert subdir_name(0, ["trainer.max_iters=6"]) == "0"


def test_unknown_sweeps_name_by_every_override_with_path_characters_replaced(monkeypatch):
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    name = subdir_name(1, ["dataset.root=/data/shapes", "dataset.augment.crop_size=[32,32]"])
    assert name == "1_dataset.augment.crop_size--32-32-+dataset.root--data-shapes"
    long = subdir_name(2, [f"dataset.root=/{'x' * 300}"])
    assert len(long) <= 125 and long.startswith("2_dataset.root--xxx")
    assert long != subdir_name(2, [f"dataset.root=/{'x' * 299}"])  # the hash keeps long names apart


def test_swept_keys_come_from_the_command_line_and_the_sweepers_params():
    config = OmegaConf.create({"hydra": {
        "overrides": {"task": ["optimizer.lr=0.01,0.02", "trainer.max_iters=6", "model=glob(psp*)"]},
        "sweeper": {"params": {"trainer.batch_size": "choice(8, 16)", "loss.aux_weight": "interval(0.1, 0.5)",
                               "trainer.seed": "1"}}}})
    assert swept_keys_of(config) == ["optimizer.lr", "model", "trainer.batch_size", "loss.aux_weight"]


def test_the_summary_has_one_row_per_finished_job_in_job_order(tmp_path, monkeypatch):
    monkeypatch.setenv(SWEPT_KEYS_ENV, json.dumps(["optimizer.lr"]))
    for job, (lr, miou) in enumerate([("0.01", 0.5), ("0.02", float("nan")), ("0.03", 0.7)]):
        run_dir = tmp_path / f"{job}_optimizer.lr-{lr}"
        run_dir.mkdir()
        write_result(run_dir, {"job": job, "overrides": ["trainer.max_iters=6", f"optimizer.lr={lr}"],
                               "best_miou": miou, "best_iteration": 6, "final_miou": miou, "iteration": 6})
    (tmp_path / "9_broken").mkdir()
    (tmp_path / "9_broken" / "result.json").write_text("{")
    rows = write_summary(tmp_path)
    assert [r["overrides"] for r in rows] == ["optimizer.lr=0.01", "optimizer.lr=0.02", "optimizer.lr=0.03"]
    with open(tmp_path / "summary.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [(r["job"], r["best_miou"]) for r in written] == [("0", "0.5"), ("1", ""), ("2", "0.7")]
    table = (tmp_path / "summary.md").read_text()
    assert "| 2 | optimizer.lr=0.03 | **70.00** | 6 |" in table and "| 1 | optimizer.lr=0.02 | n/a |" in table
    assert collect(tmp_path / "missing") == []


@pytest.mark.cli
@pytest.mark.slow
def test_optuna_maximises_the_best_miou_the_task_returns(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'segtrain[optuna]'")
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 2, "trainer.val_interval": 2})
    result = run_cli("train", "-m", *overrides, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                     "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0",
                     "optimizer.lr=tag(log,interval(0.001,0.05))", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert all(r["overrides"].startswith("optimizer.lr=") for r in rows)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(max(float(r["best_miou"]) for r in rows))
