"""What a run records: TensorBoard HParams and config, metrics.jsonl, train.log with the bar on, it/s."""

import json
import logging
import math

import pytest

from conftest import compose_config, tiny_overrides
from segtrain.commands.eval import run_eval
from segtrain.engine import logger as logger_module
from segtrain.engine.logger import Throughput, keep_until
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


def test_evaluation_logs_the_training_tag_scheme(bar_run, tmp_path):
    run_dir, _ = bar_run
    composed = compose_config("eval", [f"ckpt={run_dir / 'checkpoints' / 'last.pt'}", "trainer.device=cpu",
                                       "eval.num_workers=0", "logging.progress=false"])
    run_eval(composed, [], tmp_path)
    scalars = set(_events(tmp_path).Tags()["scalars"])
    assert {"eval/mIoU", "eval/pixel_acc", "eval/mean_acc", "eval_iou/background"} <= scalars
    assert not any("miou" in tag for tag in scalars)  # one casing: mIoU


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
