"""Early stopping (callbacks=early_stopping): patience in validations, min_delta, a normal finish at
the stopping iteration, and the same stop after a resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.engine.callbacks import EarlyStopping, configured_callbacks
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError, WeightsError


def _validate(callback: EarlyStopping, run: SimpleNamespace, miou: float) -> None:
    run.validation = SimpleNamespace(metrics={"miou": miou})
    callback.on_validation(run)


def test_patience_counts_validations_without_an_improvement_of_more_than_min_delta():
    callback, run = EarlyStopping(patience=2, min_delta=0.01), SimpleNamespace(stop_reason=None)
    for miou in (0.10, 0.20, 0.205, 0.25, 0.255, float("nan")):  # 0.205, 0.255 and NaN are no improvement
        assert run.stop_reason is None
        _validate(callback, run, miou)
    assert callback.state_dict() == {"best": 0.25, "bad_validations": 2}
    assert run.stop_reason == ("early stopping: 2 validations without an mIoU improvement of more than 1.00 points "
                               "(min_delta=0.01) over the best, 25.00% (callbacks.early_stopping.patience=2)")


def test_the_state_round_trips_and_a_run_resumed_where_it_stopped_stays_stopped():
    stopped = EarlyStopping(patience=1)
    stopped.load_state_dict({"best": 0.5, "bad_validations": 1})
    run = SimpleNamespace(stop_reason=None)
    stopped.on_fit_start(run)
    assert run.stop_reason is not None
    patient = EarlyStopping(patience=3)  # patience raised on resume: training goes on
    patient.load_state_dict(stopped.state_dict())
    run.stop_reason = None
    patient.on_fit_start(run)
    assert run.stop_reason is None and patient.best == 0.5
    for bad in ({"best": "x", "bad_validations": 0}, {"best": None, "bad_validations": -1}, {}):
        with pytest.raises(WeightsError, match="early stopping state is not valid"):
            EarlyStopping(patience=1).load_state_dict(bad)


@pytest.mark.parametrize("override,message", [
    ("callbacks.early_stopping.patience=0", "patience must be an integer >= 1"),
    ("callbacks.early_stopping.patience=1.5", "patience must be an integer >= 1"),
    ("callbacks.early_stopping.min_delta=-0.1", "min_delta must be a number >= 0"),
])
def test_bad_values_are_refused_in_one_line_naming_the_section(override, message):
    cfg = compose_config("train", ["callbacks=early_stopping", override])
    with pytest.raises(ConfigError, match=rf"^callbacks.early_stopping: EarlyStopping refused .*{message}"):
        configured_callbacks(cfg)


def test_the_group_composes_with_overrides_and_other_callbacks():
    cfg = compose_config("train", ["callbacks=early_stopping", "callbacks.early_stopping.patience=3",
                                   "+callbacks.timer={_target_: segtrain.engine.callbacks.Callback}"])
    built = configured_callbacks(cfg)
    assert [type(c).__name__ for c in built] == ["EarlyStopping", "Callback"]
    assert (built[0].patience, built[0].min_delta) == (3, 0.0)
    assert configured_callbacks(compose_config("train", ["callbacks=early_stopping",
                                                         "callbacks.early_stopping=null"])) == []


def _stalling(shapes_root, **values: object) -> list[str]:
    """A constant learning rate (the schedule does not depend on max_iters, so a shorter run is the
    start of a longer one) and min_delta 1: every validation after the first counts as a stall."""
    return [*tiny_overrides(shapes_root, **{"schedule.power": 0, "trainer.val_interval": 1, **values}),
            "callbacks=early_stopping", "callbacks.early_stopping.patience=2", "callbacks.early_stopping.min_delta=1"]


@pytest.mark.slow
def test_a_resumed_run_stops_at_the_same_iteration_in_the_same_state(tmp_path, shapes_root):
    whole = train(compose_config("train", _stalling(shapes_root, **{"trainer.max_iters": 8,
                                                                    "trainer.ckpt_interval": 4})), tmp_path / "a")
    cut = _stalling(shapes_root, **{"trainer.max_iters": 2, "trainer.ckpt_interval": 1})
    train(compose_config("train", cut), tmp_path / "b")  # ended by max_iters after 2 validations: 1 stall
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert state["train_state"]["iteration"] == 2 and state["callbacks"]["EarlyStopping"]["bad_validations"] == 1
    resumed = train(compose_config("train", [*_stalling(shapes_root, **{"trainer.max_iters": 8,
                                                                        "trainer.ckpt_interval": 4}), "resume=auto"]),
                    tmp_path / "b")
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    for saved in (a, b):  # stopped at the third validation, iteration 3 (not a checkpoint interval)
        assert saved["train_state"]["iteration"] == 3
        assert saved["callbacks"]["EarlyStopping"]["bad_validations"] == 2
    assert a["callbacks"] == b["callbacks"]
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    assert whole.final_miou == resumed.final_miou
    for run in ("a", "b"):
        result = json.loads((tmp_path / run / "result.json").read_text())
        assert (result["iteration"], result["max_iters"]) == (3, 8)


@pytest.mark.cli
@pytest.mark.slow
def test_a_run_whose_miou_stalls_stops_early_from_the_command_line(tmp_path):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{
        "trainer.max_iters": 20, "trainer.val_interval": 1, "trainer.ckpt_interval": 20, "optimizer.lr": 1e-9,
        "schedule.power": 0})
    result = run_cli("train", *overrides, "callbacks=early_stopping", "callbacks.early_stopping.patience=2",
                     "callbacks.early_stopping.min_delta=0.001", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "stopped at iteration 3 of 20: early stopping: 2 validations without an mIoU improvement" in log
    assert "iter 4/20" not in log
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"]["iteration"] == 3
    assert json.loads((tmp_path / "run" / "result.json").read_text())["iteration"] == 3


@pytest.mark.cli
def test_adding_the_group_with_plus_is_answered_with_the_plain_form(tmp_path):
    result = run_cli("train", "+callbacks=early_stopping", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("segtrain train: error: callbacks is a config group with a "
                                                      "default choice: write callbacks=early_stopping (without +)")
