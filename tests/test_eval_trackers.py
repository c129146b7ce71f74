"""`segtrain eval` records its scores to the `logger` trackers: into the checkpoint's own MLflow run (SQLite
store), into the csv tracker's files, and a tracker that cannot start stops eval before any image, naming its key."""

import csv
import json
from pathlib import Path

import pytest

from conftest import compose_config, run_cli, run_main, tiny_overrides
from segtrain import evaluate
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError
from segtrain.keys import check_effective

PROTOCOL = "shapes-val-whole"
ITERS = 4


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, shapes_root) -> tuple[Path, Path]:
    """A tiny training recorded to MLflow in a SQLite store: (training run directory, database)."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("evaltrack")
    db = root / "mlflow.db"
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": ITERS, "trainer.val_interval": ITERS,
                                               "logger": "mlflow", "logger.mlflow.tracking_uri": f"sqlite:///{db}"})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the artifacts of a SQLite store go to ./mlruns, fixed when the experiment is created
        train(compose_config("train", overrides), root / "run")
    return root / "run", db


def mlflow_runs(db: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("segtrain")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.cli
@pytest.mark.slow
def test_eval_records_into_the_training_runs_mlflow_run(mlflow_run, tmp_path):
    run, db = mlflow_run
    result = run_cli("eval", f"ckpt={run / 'checkpoints' / 'last.pt'}", "logger=mlflow",
                     f"logger.mlflow.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'ev'}",
                     "eval.num_workers=0", "logging.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    client, runs = mlflow_runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the training's run, left as training ended it
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, f"eval/{PROTOCOL}/mIoU")
    assert [(m.step, m.value) for m in history] == [(ITERS, pytest.approx(written["miou"]))]
    assert client.get_metric_history(run_id, f"eval/{PROTOCOL}/pixel_acc")[0].value == pytest.approx(
        written["pixel_acc"])
    assert client.get_metric_history(run_id, f"eval/{PROTOCOL}/iou/background")[0].step == ITERS
    assert steps_of(client, run_id, "val/mIoU") == [ITERS]  # training's points stay as they were
    folder = f"eval/{PROTOCOL}/{ITERS:07d}"
    assert {a.path for a in client.list_artifacts(run_id, folder)} == {f"{folder}/confusion_matrix.png",
                                                                      f"{folder}/metrics.json"}
    copied = client.download_artifacts(run_id, f"{folder}/metrics.json", str(tmp_path))
    assert json.loads(Path(copied).read_text())["miou"] == pytest.approx(written["miou"])
    assert not list((tmp_path / "ev").glob("events.out.tfevents.*"))  # logger=mlflow alone: no TensorBoard


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_without_the_checkpoints_run_on_that_store_eval_starts_a_run_named_after_its_directory(mlflow_run, tmp_path,
                                                                                                 monkeypatch):
    run, _ = mlflow_run
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.db"
    ev = tmp_path / "2024-05-01" / "12-00-00-eval"
    result = evaluate(run / "checkpoints" / "last.pt", ["logger=[mlflow]", f"logger.mlflow.tracking_uri=sqlite:///{other}",
                                                       f"hydra.run.dir={ev}", "eval.num_workers=0",
                                                       "logging.progress=false"])
    client, runs = mlflow_runs(other)
    assert len(runs) == 1 and runs[0].info.run_name == "2024-05-01/12-00-00-eval"
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["segtrain.run_dir"] == str(ev.resolve())
    assert runs[0].data.metrics[f"eval/{PROTOCOL}/mIoU"] == pytest.approx(result["miou"])


@pytest.mark.slow
def test_eval_logger_csv_writes_the_scores_in_the_evaluations_directory(mlflow_run, tmp_path):
    run, _ = mlflow_run
    ev = tmp_path / "ev"
    result = evaluate(run, ["logger=csv", "eval.flip=true", f"hydra.run.dir={ev}", "eval.num_workers=0",
                            "logging.progress=false"])
    rows = list(csv.DictReader((ev / "csv" / "metrics.csv").open()))
    values = {r["tag"]: float(r["value"]) for r in rows}
    assert {int(r["iteration"]) for r in rows} == {ITERS}
    prefix = f"eval/{PROTOCOL}-flip"
    assert values[f"{prefix}/mIoU"] == pytest.approx(result["miou"])
    assert values[f"{prefix}/mean_acc"] == pytest.approx(result["mean_acc"])
    assert {f"{prefix}/pixel_acc", f"{prefix}/iou/background"} <= set(values)
    assert [p.name for p in (ev / "csv" / "images").iterdir()] == [
        f"eval_{PROTOCOL}-flip_confusion_matrix_{ITERS:07d}.png"]
    assert not list(ev.glob("events.out.tfevents.*")) and not (run / "eval" / f"{PROTOCOL}-flip").exists()


@pytest.mark.cli
@pytest.mark.slow
def test_a_bad_tracking_uri_stops_eval_before_any_image_naming_the_key(mlflow_run, tmp_path):
    run, _ = mlflow_run
    result = run_cli("eval", f"ckpt={run}", "logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=nowhere://x",
                     f"hydra.run.dir={tmp_path / 'ev'}", "eval.num_workers=0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "logger.mlflow: cannot start recording" in errors[0], result.stderr
    assert "evaluating" not in (tmp_path / "ev" / "eval.log").read_text()
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_logger_is_an_eval_key_and_shows_in_its_help(tmp_path, monkeypatch, capsys):
    check_effective("logger.mlflow.tracking_uri", "eval")
    with pytest.raises(ConfigError, match="logger has no effect on predict: only train and eval record"):
        check_effective("logger", "predict")
    cfg = compose_config("eval", ["ckpt=x.pt", "logger=[tensorboard,csv]"])
    assert list(cfg.logger) == ["tensorboard", "csv"]
    assert list(compose_config("eval", ["ckpt=x.pt"]).logger) == ["tensorboard"]  # the default, as before
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_main(capsys, "eval", "--help")
    assert status == 0 and "logger: csv, mlflow, tensorboard, wandb" in out and "logger.mlflow" in out


@pytest.mark.slow
def test_eval_logger_wandb_resumes_the_training_runs_wandb_run(tmp_path, shapes_root, monkeypatch):
    pytest.importorskip("wandb")
    from test_trackers import wandb_summary

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(compose_config("train", tiny_overrides(shapes_root, **{"trainer.max_iters": ITERS, "logger": "wandb"})), run)
    result = evaluate(run, ["logger=wandb", f"hydra.run.dir={tmp_path / 'ev'}", "eval.num_workers=0",
                            "logging.progress=false"])
    logs = sorted((tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and logs[0].name == logs[1].name, logs  # the training's run id, resumed
    summary = wandb_summary(logs[1])
    assert summary[f"eval/{PROTOCOL}/mIoU"] == pytest.approx(result["miou"])
    assert summary["eval/iteration"] == result["iteration"]  # eval's own x-axis: the checkpoint's iteration
    assert summary[f"eval/{PROTOCOL}/confusion_matrix/_type"] == "image-file"
