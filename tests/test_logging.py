"""What a run records: TensorBoard HParams and config, metrics.jsonl, train.log with the bar on, it/s."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from conftest import compose_config, tiny_overrides
from segtrain.commands.eval import run_eval
from segtrain.engine import logger as logger_module
from segtrain.engine.hparams import run_hparams
from segtrain.engine.logger import Throughput, keep_until, tensorboard_logdir
from segtrain.engine.trainer import train

MAX_ITERS, INTERVAL = 5, 2  # logged at 2, 4 and 5 (the last, shorter window); validated at 3 and 5


@pytest.fixture(scope="module")
def bar_run(tmp_path_factory, shapes_root):
    """One short run with the progress bar forced on and Hydra's two handlers (console, train.log)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.max_iters": MAX_ITERS, "logging.interval": INTERVAL, "logging.progress": "true"}))
    root = logging.getLogger()
    file_handler = logging.FileHandler(run_dir / "train.log")
    console = logging.StreamHandler(open(run_dir / "console.txt", "w"))  # noqa: SIM115 - closed below
    for handler in (file_handler, console):
        handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("segtrain.engine.callbacks.progress.progress_enabled", lambda requested: bool(requested))
        patch.setattr(logger_module, "_is_console", lambda handler: handler is console)
        try:
            result = train(cfg, run_dir)
        finally:
            root.setLevel(level)
            for handler in (file_handler, console):
                root.removeHandler(handler)
                handler.close()
    return run_dir, result


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir)).Reload()


@pytest.mark.slow
def test_the_event_file_holds_the_hparams_entry_with_best_miou_and_the_config(bar_run):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    run_dir, result = bar_run
    assert [p.name for p in run_dir.iterdir() if p.is_dir()] == ["checkpoints"]  # no hparams sub-run
    events = _events(run_dir)
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/best_mIoU", "val/mIoU"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    hparams = session.session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.02)
    assert hparams["trainer.max_iters"].number_value == MAX_ITERS
    assert hparams["dataset.augment.crop_size"].string_value == "[32, 32]"
    assert hparams["model"].string_value == "DeepLabV3Plus" and hparams["dataset"].string_value == "shapes"
    assert metadata.SESSION_END_INFO_TAG in content
    best = events.Scalars("val/best_mIoU")
    assert [e.step for e in best] == [3, 5]
    assert best[-1].value == pytest.approx(result.best_miou)
    assert events.Scalars("val/mIoU")[-1].value == pytest.approx(result.final_miou)
    assert "config/text_summary" in events.Tags()["tensors"]
    assert f"max_iters: {MAX_ITERS}" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_metrics_jsonl_has_one_line_per_logged_step_with_the_tensorboard_values(bar_run):
    run_dir, result = bar_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 3, 4, 5]
    assert all(isinstance(line["time"], float) for line in lines)
    assert [line["train/loss"] for line in lines if "train/loss" in line] == pytest.approx(
        [h["loss"] for h in result.history])
    assert {"val/mIoU", "val/best_mIoU", "val_iou/background"} <= set(lines[1])
    events = _events(run_dir)
    for tag in ("train/loss", "train/lr", "val/mIoU", "val/pixel_acc", "val_iou/background"):
        logged = {line["iteration"]: line[tag] for line in lines if tag in line}
        assert logged == pytest.approx({e.step: e.value for e in events.Scalars(tag)}, rel=1e-6), tag
    written = json.loads((run_dir / "result.json").read_text())
    assert written["best_miou"] == pytest.approx(result.best_miou) and written["iteration"] == MAX_ITERS


def test_train_log_gets_the_loss_lines_and_iou_tables_with_the_bar_on(bar_run):
    run_dir, _ = bar_run
    log = (run_dir / "train.log").read_text()
    for iteration in (2, 4, 5):
        assert f"iter {iteration}/{MAX_ITERS}: loss " in log and "it/s, eta " in log
    assert log.count(": val mIoU") == 2
    table = log.split("iter 3: val mIoU", 1)[1]
    assert "\nclass " in table and "\nbackground " in table and "\ncross " in table and "\nmIoU " in table
    console = (run_dir / "console.txt").read_text()
    assert "val mIoU" in console  # through tqdm.write, above the bar
    assert "iter 2/" not in console  # the bar shows loss and LR on the console


def _event_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("events.out.tfevents"))


def _copied_run(run_dir, target):
    """A training run's checkpoint and record in a directory of the test's own (the fixture's run stays as it is)."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "last.pt", target / "checkpoints" / "last.pt")
    shutil.copy(run_dir / "metrics.jsonl", target / "metrics.jsonl")
    return target


def _eval(ckpt, eval_dir, *overrides):
    composed = compose_config("eval", [f"ckpt={ckpt}", "trainer.device=cpu", "eval.num_workers=0",
                                       "logging.progress=false", *overrides])
    eval_dir.mkdir()  # as Hydra does
    run_eval(composed, list(overrides), eval_dir)


@pytest.mark.slow
def test_evaluation_events_go_beside_their_training_run_with_the_training_tag_scheme(bar_run, tmp_path):
    run = _copied_run(bar_run[0], tmp_path / "run")
    _eval(run / "checkpoints" / "last.pt", tmp_path / "ev")
    events_dir = run / "eval" / "shapes-val-whole"
    assert _event_files(events_dir) and not _event_files(tmp_path / "ev")  # one place: no twin run in TensorBoard
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "per_class_iou.csv").is_file()
    scalars = set(_events(events_dir).Tags()["scalars"])
    assert {"eval/mIoU", "eval/pixel_acc", "eval/mean_acc", "eval_iou/background"} <= scalars
    assert not any("miou" in tag for tag in scalars)  # one casing: mIoU
    assert _events(events_dir).Scalars("eval/mIoU")[0].step == MAX_ITERS  # the checkpoint's iteration
    # Another protocol gets a directory of its own; the first one's events stay.
    _eval(run / "checkpoints" / "last.pt", tmp_path / "ev2", "eval.flip=true", "eval.scales=[0.75,1.0]")
    assert _event_files(run / "eval" / "shapes-val-whole-ms0.75-1-flip") and len(_event_files(events_dir)) == 1


@pytest.mark.slow
def test_evaluation_events_stay_in_its_own_directory_outside_a_training_run(bar_run, tmp_path):
    loose = tmp_path / "weights"
    loose.mkdir()
    shutil.copy(bar_run[0] / "checkpoints" / "last.pt", loose / "last.pt")
    _eval(loose / "last.pt", tmp_path / "ev")
    assert _event_files(tmp_path / "ev") and not (loose / "eval").exists()
    # A file of the user's where the folder would go is left as it is; the events stay with the evaluation.
    run = _copied_run(bar_run[0], tmp_path / "run")
    (run / "eval").write_text("my notes")
    _eval(run / "checkpoints" / "last.pt", tmp_path / "ev2")
    assert (run / "eval").read_text() == "my notes" and _event_files(tmp_path / "ev2")


@pytest.mark.slow
def test_validation_image_panels_are_at_least_256_pixels_high(bar_run):
    images = _events(bar_run[0]).Images("val_images/0")
    assert [image.step for image in images] == [3, MAX_ITERS]
    assert images[-1].height >= 256 and images[-1].width >= 3 * 256


def test_tensorboard_is_pointed_above_the_run_so_the_run_has_a_name(tmp_path, monkeypatch):
    assert tensorboard_logdir(tmp_path / "2024-05-01" / "12-00-00") == tmp_path / "2024-05-01"
    assert tensorboard_logdir(tmp_path / "multirun" / "12-00-00" / "3") == tmp_path / "multirun" / "12-00-00"
    monkeypatch.chdir(tmp_path)
    assert tensorboard_logdir(Path(".")) == tmp_path.parent


def test_hparams_leave_out_keys_that_do_not_change_the_result():
    overrides = ["optimizer.lr=0.05", "logging.interval=5", "logging.image_interval=100", "trainer.num_workers=0",
                 "eval.num_workers=0", "hydra.run.dir=/tmp/x", "trainer.ckpt_interval=50", "trainer.seed=3",
                 "eval.flip=true"]
    cfg = compose_config("train", ["experiment=quickstart", *[o for o in overrides if not o.startswith("hydra.")]])
    hparams = run_hparams(cfg, overrides, {})
    assert hparams["optimizer.lr"] == pytest.approx(0.05)
    assert hparams["trainer.seed"] == 3 and hparams["eval.flip"] == "true"
    assert not [key for key in hparams if key.startswith(("logging.", "hydra."))]
    assert not {"trainer.num_workers", "eval.num_workers", "trainer.ckpt_interval"} & set(hparams)


def test_it_per_s_counts_the_iterations_of_a_short_last_window(monkeypatch):
    clock = iter([100.0, 110.0, 111.0, 113.0, 114.0])
    monkeypatch.setattr(logger_module.time, "perf_counter", lambda: next(clock))
    speed = Throughput(0)  # 100
    assert speed.rate(20) == pytest.approx(2.0)  # 20 iterations in 10 s
    with speed.excluded():  # 111 -> 113: validation, not counted
        pass
    assert speed.rate(25) == pytest.approx(2.5)  # the last window: 5 iterations in 4 s less 2 s of validation


def test_a_resumed_run_drops_the_lines_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "train/loss": 1.0 / i}) + "\n" for i in range(1, 7))
                    + '{"iteration": 7, "tra')  # killed while writing
    keep_until(path, 4)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_nan_is_written_as_null(tmp_path):
    records = logger_module.RunLogger(tmp_path, enabled=True, tensorboard=False)
    records.open(0)
    records.scalars(1, {"val/mIoU": math.nan, "train/loss": 0.5})
    records.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line.pop("time") > 0
    assert line == {"iteration": 1, "val/mIoU": None, "train/loss": 0.5}


def test_the_eta_counts_the_validations_and_checkpoints_still_due(monkeypatch):
    """100 iterations at 2 it/s, validation every 20 (4 s each), checkpoint every 50 (1 s each)."""
    from segtrain.engine.logger import due_count, format_remaining, remaining_seconds

    assert [due_count(i, 100, 20) for i in (0, 15, 20, 99, 100)] == [5, 5, 4, 1, 0]
    assert [due_count(i, 90, 20) for i in (0, 80, 85)] == [5, 1, 1]  # 20, 40, 60, 80 and the last, 90
    clock = iter([0.0, 10.0, 14.0, 20.0, 21.0])
    monkeypatch.setattr(logger_module.time, "perf_counter", lambda: next(clock))
    speed = Throughput(0)  # 0
    intervals = {"validation": 20, "checkpoint": 50}
    seconds, unmeasured = remaining_seconds(15, 100, 2.0, intervals, speed)
    assert seconds == pytest.approx(42.5) and unmeasured == {"validation": 5, "checkpoint": 2}
    assert format_remaining(seconds, unmeasured) == "0:00:42 + 5 validations + 2 checkpoints"
    with speed.excluded("validation"):  # 10 -> 14
        pass
    with speed.excluded("checkpoint"):  # 20 -> 21
        pass
    seconds, unmeasured = remaining_seconds(20, 100, 2.0, intervals, speed)
    assert unmeasured == {} and seconds == pytest.approx(80 / 2 + 4 * 4.0 + 2 * 1.0)
    assert format_remaining(seconds, unmeasured) == "0:00:58"
