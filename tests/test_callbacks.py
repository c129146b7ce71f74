"""The training loop's callbacks: the events' order, a user's callback from the command line, and
segtrain's own callbacks each on their own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.engine.callbacks import Callback, CallbackList, NonFiniteGuard, configured_callbacks
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError, TrainingStopped

RECORDER = '''
import json
from pathlib import Path

from segtrain.engine.callbacks import Callback


class Recorder(Callback):
    """Appends one JSON line per validation and checkpoint to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def write(self, record):
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\\n")

    def on_validation(self, run):
        self.write({"event": "validation", "iteration": run.validation.iteration,
                    "miou": run.validation.metrics["miou"]})

    def on_checkpoint(self, run):
        self.write({"event": "checkpoint", "iteration": run.state.iteration, "path": str(run.last_checkpoint)})


class NotACallback:
    pass
'''


class EventLog(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, run):
        self.events.append(("fit_start", run.state.iteration))

    def on_step_end(self, run, result):
        self.events.append(("step_end", run.state.iteration))

    def on_log(self, run, result):
        self.events.append(("log", run.state.iteration))

    def on_validation(self, run):
        assert run.validation.iteration == run.state.iteration  # the validation callback ran before this one
        self.events.append(("validation", run.state.iteration))

    def on_checkpoint(self, run):
        assert run.last_checkpoint.is_file()
        self.events.append(("checkpoint", run.state.iteration))

    def on_iteration_end(self, run):
        self.events.append(("iteration_end", run.state.iteration))

    def on_fit_end(self, run):
        self.events.append(("fit_end", run.state.iteration))

    def on_close(self, run):
        self.events.append(("close", run.state.iteration))


@pytest.mark.slow
def test_events_come_in_loop_order_at_their_intervals(tmp_path, shapes_root):
    log = EventLog()
    cfg = compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.max_iters": 4, "trainer.val_interval": 3, "trainer.ckpt_interval": 2, "logging.interval": 2}))
    train(cfg, tmp_path, callbacks=[log])
    expected = [("fit_start", 0)]
    for it in range(1, 5):
        expected.append(("step_end", it))
        expected += [("log", it)] if it % 2 == 0 else []
        expected += [("validation", it)] if it in (3, 4) else []
        expected += [("checkpoint", it)] if it % 2 == 0 else []
        expected.append(("iteration_end", it))
    expected += [("fit_end", 4), ("close", 4)]
    assert log.events == expected


@pytest.mark.cli
def test_a_callback_from_the_command_line_records_validations_and_checkpoints(tmp_path, shapes_root):
    """A user's module outside segtrain, named with +callbacks.NAME: no edit of segtrain."""
    (tmp_path / "my_callbacks.py").write_text(RECORDER)
    records, run_dir = tmp_path / "records.jsonl", tmp_path / "run"
    args = [*tiny_overrides(shapes_root, **{"trainer.max_iters": 4, "trainer.val_interval": 2,
                                            "trainer.ckpt_interval": 4}),
            f"+callbacks.record={{_target_: my_callbacks.Recorder, path: '{records}'}}", f"hydra.run.dir={run_dir}"]
    done = run_cli("train", *args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})  # the checkout comes first
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(r["event"], r["iteration"]) for r in lines] == [("validation", 2), ("validation", 4), ("checkpoint", 4)]
    assert all(0.0 <= r["miou"] <= 1.0 for r in lines if r["event"] == "validation")
    assert Path(lines[-1]["path"]) == run_dir / "checkpoints" / "iter_0000004.pt"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/mIoU"] for r in logged if "val/mIoU" in r] == pytest.approx([r["miou"] for r in lines[:2]])


def test_a_callback_key_its_class_does_not_take_is_refused_in_one_line(tmp_path):
    (tmp_path / "my_callbacks_keys.py").write_text(RECORDER)
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = compose_config("train", ["+callbacks.record={_target_: my_callbacks_keys.Recorder, path: x, every: 2}"])
        with pytest.raises(ConfigError, match=r"unknown key callbacks.record.every for Recorder"):
            configured_callbacks(cfg)
        cfg = compose_config("train", ["+callbacks.record={_target_: my_callbacks_keys.NotACallback}"])
        with pytest.raises(ConfigError, match=r"callbacks.record._target_='my_callbacks_keys.NotACallback' is not a "):
            configured_callbacks(cfg)
        cfg = compose_config("train", ["+callbacks.record=null"])
        assert configured_callbacks(cfg) == []
    finally:
        sys.path.remove(str(tmp_path))


def test_close_reaches_every_callback_even_when_one_fails():
    closed = []

    class Closing(Callback):
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def on_close(self, run):
            closed.append(self.name)
            if self.fail:
                raise RuntimeError(self.name)

    with pytest.raises(RuntimeError, match="b"):
        CallbackList([Closing("a"), Closing("b", fail=True), Closing("c")]).on_close(None)
    assert closed == ["c", "b", "a"]


def _guard_run(skipped_limit: int = 1, nan_policy: str = "stop") -> SimpleNamespace:
    records = SimpleNamespace(scalars=lambda iteration, values: None)
    return SimpleNamespace(
        state=SimpleNamespace(iteration=0, skipped_steps=0), runtime=SimpleNamespace(device=torch.device("cpu")),
        ctx=SimpleNamespace(enabled=False),
        cfg=SimpleNamespace(trainer=SimpleNamespace(max_skipped_steps=skipped_limit, nan_policy=nan_policy)),
        step=SimpleNamespace(lr=lambda iteration: 0.01), records=records, last_good_checkpoint=lambda: "last.pt")


def test_the_non_finite_guard_names_the_first_bad_iteration_when_asked():
    run, guard = _guard_run(), NonFiniteGuard()
    guard.on_fit_start(run)
    for iteration, finite in ((1, True), (2, False), (3, False)):
        run.state.iteration = iteration
        guard.on_step_end(run, SimpleNamespace(skipped=torch.tensor(False), finite=torch.tensor(finite)))
    with pytest.raises(TrainingStopped, match=r"non-finite loss at iteration 2 .*Last good checkpoint: last.pt"):
        guard.on_checkpoint(run)


def test_the_non_finite_guard_counts_skipped_steps_up_to_the_limit():
    """Skipped steps are counted on the device and read (counted, checked against the limit) when asked."""
    run, guard = _guard_run(skipped_limit=1, nan_policy="skip"), NonFiniteGuard()
    guard.on_fit_start(run)
    run.state.iteration = 1
    guard.on_step_end(run, SimpleNamespace(skipped=torch.tensor(True), finite=torch.tensor(False)))
    assert run.state.skipped_steps == 0  # not read yet
    guard.on_log(run, None)
    assert run.state.skipped_steps == 1
    for iteration in (2, 3):
        run.state.iteration = iteration
        guard.on_step_end(run, SimpleNamespace(skipped=torch.tensor(iteration == 2), finite=torch.tensor(False)))
    with pytest.raises(TrainingStopped, match=r"2 steps had a non-finite loss \(trainer.max_skipped_steps=1\); "
                                              r"last at iteration 2"):
        guard.on_checkpoint(run)


class CountValidations(Callback):
    """A callback with a past: how many validations it has seen, carried over a resume."""

    def __init__(self) -> None:
        self.seen = 0
        self.at_start = None

    def on_fit_start(self, run):
        self.at_start = self.seen

    def on_validation(self, run):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])


@pytest.mark.slow
def test_a_callbacks_state_is_saved_in_checkpoints_and_restored_on_resume(tmp_path, shapes_root):
    first = CountValidations()
    values = {"trainer.max_iters": 4, "trainer.val_interval": 1, "trainer.ckpt_interval": 4}
    train(compose_config("train", tiny_overrides(shapes_root, **values)), tmp_path, callbacks=[first])
    assert first.seen == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["callbacks"] == {"CountValidations": {"seen": 4}}
    resumed = CountValidations()
    values["trainer.max_iters"] = 5
    train(compose_config("train", [*tiny_overrides(shapes_root, **values), "resume=auto"]), tmp_path,
          callbacks=[resumed])
    assert resumed.at_start == 4 and resumed.seen == 5  # restored before on_fit_start, then one more validation


def test_callback_states_are_keyed_by_class_and_stateless_callbacks_save_nothing():
    a, b = CountValidations(), CountValidations()
    a.seen, b.seen = 2, 3
    callbacks = CallbackList([NonFiniteGuard(), a, b])
    assert callbacks.state_dict() == {"CountValidations": {"seen": 2}, "CountValidations#2": {"seen": 3}}
    fresh = [CountValidations(), CountValidations()]
    CallbackList([NonFiniteGuard(), *fresh]).load_state_dict(callbacks.state_dict())
    assert [c.seen for c in fresh] == [2, 3]
