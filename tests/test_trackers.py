"""Experiment trackers (the `logger` group): CSV, MLflow (SQLite store) and W&B (offline) record the run and
continue it on resume; a tracker that cannot start stops the run before the first step, naming its key."""

import csv
import json
import signal
import struct
import time
from pathlib import Path

import pytest

from conftest import compose_config, run_cli, start_cli, tiny_overrides
from segtrain.engine.callbacks import configured_trackers
from segtrain.engine.callbacks import tracker as tracker_module
from segtrain.engine.callbacks.csv_tracker import keep_rows_until
from segtrain.engine.callbacks.tracker import tracker_run_name
from segtrain.engine.logger import RunLogger
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError

MAX_ITERS = 8


def metrics_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tracker_runs_are_named_after_the_run_directory(tmp_path):
    assert tracker_run_name(tmp_path / "2024-05-01" / "12-00-00") == "2024-05-01/12-00-00"
    assert tracker_run_name(tmp_path / "multirun" / "12-00-00" / "3_optimizer.lr-0.1") == "12-00-00/3_optimizer.lr-0.1"


def test_the_default_is_tensorboard_and_logging_tensorboard_false_switches_it_off():
    cfg = compose_config("train", ["experiment=quickstart"])
    assert [t.key for t in configured_trackers(cfg)] == ["logger.tensorboard"]
    cfg = compose_config("train", ["experiment=quickstart", "logger=[tensorboard,csv]", "logging.tensorboard=false"])
    assert [t.key for t in configured_trackers(cfg)] == ["logger.csv"]
    assert configured_trackers(compose_config("train", ["experiment=quickstart", "logger=[]"])) == []


def test_a_logger_without_its_package_names_the_extra_to_install(monkeypatch):
    cfg = compose_config("train", ["experiment=quickstart", "logger=[tensorboard,mlflow]"])
    real = tracker_module.importlib.util.find_spec
    monkeypatch.setattr(tracker_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger\.mlflow needs the mlflow package: pip install -e '\.\[mlflow\]'"):
        configured_trackers(cfg)


def test_a_tracker_failing_during_training_is_left_out_with_a_warning(tmp_path, caplog):
    class Broken:
        key, records_images = "logger.broken", True

        def log_scalars(self, iteration, values):
            raise ConnectionError("server went away")

    records = RunLogger(tmp_path, enabled=True)
    records.attach(Broken())
    records.open(0)
    records.scalars(1, {"train/loss": 0.5})
    records.scalars(2, {"train/loss": 0.4})
    records.close()
    assert records.trackers == [] and len(metrics_jsonl(tmp_path)) == 2
    assert caplog.text.count("logger.broken stopped recording (ConnectionError: server went away)") == 1


def test_a_resumed_csv_drops_the_rows_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("iteration,tag,value\n" + "".join(f"{i},train/loss,{1 / i}\n" for i in range(1, 7)) + "7,tra")
    keep_rows_until(path, 4)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["iteration", "tag", "value"] and [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_csv_records_every_scalar_the_hparams_the_config_and_the_images(tmp_path, shapes_root):
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 6, "logger": "csv"})
    result = train(compose_config("train", overrides), tmp_path)
    folder = tmp_path / "csv"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    from_csv = {(int(r["iteration"]), r["tag"]): float(r["value"]) for r in rows}
    from_jsonl = {(line["iteration"], tag): value for line in metrics_jsonl(tmp_path)
                  for tag, value in line.items() if tag not in ("iteration", "time")}
    assert from_csv == pytest.approx(from_jsonl) and len(rows) == len(from_jsonl)
    assert from_csv[(6, "val/best_mIoU")] == pytest.approx(result.best_miou)
    assert any(tag.startswith("val_iou/") for _, tag in from_csv)
    hparams = dict(csv.reader((folder / "hparams.csv").open()))
    assert hparams["model"] == "DeepLabV3Plus" and hparams["trainer.max_iters"] == "6"  # no Hydra: the class name
    assert "max_iters: 6" in (folder / "config.yaml").read_text()
    assert sorted(p.name for p in (folder / "images").iterdir())[:2] == ["val_images_0_0000003.png",
                                                                        "val_images_0_0000006.png"]
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # logger=csv alone: no TensorBoard


def mlflow_overrides(shapes_root: Path, run_dir: Path, db: Path, **extra) -> list[str]:
    values = {"trainer.max_iters": MAX_ITERS, "trainer.val_interval": 4, "trainer.ckpt_interval": 100,
              "logger": "[tensorboard,mlflow]", "logger.mlflow.tracking_uri": f"sqlite:///{db}", **extra}
    return [*tiny_overrides(shapes_root, **values), f"hydra.run.dir={run_dir}"]


def only_run(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("segtrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.cli
@pytest.mark.slow
def test_mlflow_run_stopped_by_sigterm_and_resumed_is_one_run_with_every_point_once(tmp_path, shapes_root):
    pytest.importorskip("mlflow")
    run_dir, db = tmp_path / "outputs" / "2024-05-01" / "12-00-00", tmp_path / "mlflow.db"
    args = mlflow_overrides(shapes_root, run_dir, db)
    proc = start_cli("train", *args, cwd=tmp_path)
    log = run_dir / "train.log"
    while not (log.exists() and "iter 3/" in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    client, run = only_run(db)
    assert run.info.status == "KILLED"
    resumed = run_cli("train", *args, "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing MLflow run" in log.read_text()
    client, run = only_run(db)
    assert run.info.status == "FINISHED" and run.info.run_name == "2024-05-01/12-00-00"
    assert steps(client, run, "train/loss") == list(range(1, MAX_ITERS + 1))
    assert steps(client, run, "val/mIoU") == [4, 8]
    assert steps(client, run, "val_iou/background") == [4, 8]  # per-class IoU, under the class's name
    assert run.data.params["model"] == "deeplabv3plus" and float(run.data.params["optimizer.lr"]) > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "val_images"} <= artifacts
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert f"max_iters: {MAX_ITERS}" in Path(config).read_text()


@pytest.mark.slow
def test_mlflow_skips_the_points_a_killed_process_logged_after_its_last_checkpoint(tmp_path, shapes_root,
                                                                                     monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts of a SQLite store go to ./mlruns
    db = tmp_path / "mlflow.db"
    overrides = mlflow_overrides(shapes_root, tmp_path, db, **{"trainer.max_iters": 6, "trainer.ckpt_interval": 3,
                                                               "trainer.val_interval": 3})[:-1]
    train(compose_config("train", overrides), tmp_path)
    # As if killed after iteration 6 was logged but before its checkpoint: the newest checkpoint is iteration 3's.
    for name in ("last.pt", "iter_0000006.pt", "best.pt"):
        (tmp_path / "checkpoints" / name).unlink(missing_ok=True)
    train(compose_config("train", [*overrides, "resume=auto"]), tmp_path)
    client, run = only_run(db)
    assert steps(client, run, "train/loss") == list(range(1, 7))
    assert steps(client, run, "val/mIoU") == [3, 6]


@pytest.mark.cli
@pytest.mark.slow
def test_a_bad_tracking_uri_stops_the_run_before_the_first_step_naming_the_key(tmp_path, shapes_root):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(shapes_root, **{"logger": "mlflow", "logger.mlflow.tracking_uri": "nowhere://x"}),
            f"hydra.run.dir={run_dir}"]
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "logger.mlflow: cannot start recording" in error[0], result.stderr
    assert "iter 1/" not in (run_dir / "train.log").read_text()
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def wandb_summary(path: Path) -> dict:
    """The summary of an offline W&B run, read from its transaction log (`run-<id>.wandb`): a LevelDB-style log
    (7-byte file header; records of 7-byte header, checksum, length, type, in 32 KiB blocks) of protobuf
    Records, which wandb no longer reads back in Python."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    summary, pos, pending = {}, header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        pending += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "summary":
                summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
    return summary


@pytest.mark.cli
@pytest.mark.slow
def test_wandb_offline_run_summary_has_the_best_miou(tmp_path, shapes_root):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(shapes_root, **{"trainer.max_iters": 6, "logger": "wandb"}), f"hydra.run.dir={run_dir}"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}
    result = run_cli("train", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    best = json.loads((run_dir / "result.json").read_text())["best_miou"]
    logs = list((tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, list((tmp_path / "wandb_dir").rglob("*"))
    summary = wandb_summary(logs[0])
    assert summary["best_mIoU"] == pytest.approx(best) and summary["val/best_mIoU"] == pytest.approx(best)
    assert summary["best_iteration"] in (3, 6)
    files = logs[0].parent / "files"
    assert "max_iters: 6" in (files / "segtrain_config.yaml").read_text()
    assert len(list((files / "media" / "images" / "val_images").glob("*.png"))) == 8  # 4 panels x 2 validations
