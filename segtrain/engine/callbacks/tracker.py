"""Experiment trackers: the `logger` config group (conf/logger/), one callback per tracker.

    segtrain train logger=[tensorboard,mlflow] logger.mlflow.tracking_uri=http://mlflow:5000

Every tracker records the same things, through `run.records` (segtrain.engine.logger.RunLogger, which
also writes metrics.jsonl): every scalar at its iteration (losses, learning rate, validation metrics and
the per-class IoU `val_iou/<class>`), the hyper-parameters (segtrain.engine.hparams), the composed config,
and the validation images with their legend. A subclass implements `start` and the `log_*` methods it
needs; this class does the rest:

- `start` runs in on_fit_start on rank 0 (after the resume, before the first step). Any failure there
  (a bad URI, a server that does not answer, a missing package) stops the run with one line naming the
  tracker's key, on every process. Once started, a failure is a warning and the tracker is left out.
- A tracker with a run of its own on a server (MLflow, W&B) keeps its id in `run_id`, which is saved in
  every checkpoint (state_dict): a resumed run continues the same tracker run.
- Its run is named after the run directory (`<date>/<time>`, or `<sweep time>/<job>` for a sweep job).
- `segtrain eval` records a checkpoint's scores through `start_evaluation`, `record_evaluation` and
  `finish_evaluation` (segtrain.engine.eval_tracking); `run_id` then comes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.distributed import broadcast_object
from segtrain.errors import ConfigError, SegtrainError, first_line

if TYPE_CHECKING:
    from segtrain.engine.eval_tracking import EvalScores, Evaluation
    from segtrain.engine.run import Run

log = logging.getLogger("segtrain.train")

RUN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # what a checkpoint may give back as a tracker run's id


def tracker_run_name(run_dir: Path) -> str:
    """The run directory's last two parts: `2024-05-01/12-00-00`, or `12-00-00/3_optimizer.lr-0.1` for a sweep
    job (its parent is the sweep's time, its own name the job's number and overrides)."""
    resolved = Path(run_dir).resolve()
    return "/".join(part for part in (resolved.parent.name, resolved.name) if part)


class Tracker(Callback):
    """One experiment tracker. `key` is its config key (`logger.<name>`), set when it is built from the config."""

    name = "tracker"  # its option in conf/logger/: the key is logger.<name>
    package: str | None = None  # the module it needs (None: segtrain's own dependencies suffice)
    extra: str | None = None  # the pyproject extra that installs it
    records_images = True

    def __init__(self) -> None:
        self.key = f"logger.{self.name}"
        self.run_id: str | None = None  # the tracker's own run, continued on resume
        self.started = False
        self.status = "failed"  # how the run ended, for `finish`: finished | preempted | failed
        if self.package is not None and importlib.util.find_spec(self.package) is None:
            raise ConfigError(f"{self.key} needs the {self.package} package: pip install -e '.[{self.extra}]' "
                              f"(or pip install {self.package}), or choose another logger")

    # -- what a tracker implements -------------------------------------------------------------------------

    def start(self, run: Run) -> None:
        """Open the connection or files; on resume (`run.state.iteration` > 0) continue `run_id`'s run."""

    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        pass

    def log_image(self, tag: str, image: Any, iteration: int) -> None:
        """`image`: HxWx3 uint8 RGB (a validation panel: input, ground truth, prediction, legend)."""

    def log_run_info(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                     iteration: int) -> None:
        pass

    def log_session_end(self, iteration: int) -> None:
        pass

    def log_fit_end(self, run: Run) -> None:
        """After the last step (rank 0): the best mIoU, the best checkpoint as an artifact."""

    def finish(self, run: Run) -> None:
        """Close; `self.status` says how the run ended."""

    # -- what a tracker implements to record `segtrain eval` (segtrain.engine.eval_tracking) ----------------------

    def start_evaluation(self, evaluation: Evaluation) -> None:
        """Open before the first image: into `run_id`'s run when the checkpoint gave one, else a new run."""
        raise ConfigError(f"{self.key}: {type(self).__name__} records training only (it has no start_evaluation); "
                          "leave it out of logger= at eval")

    def record_evaluation(self, evaluation: Evaluation, scores: EvalScores) -> None:
        """The scalars `scores.scalars(evaluation.prefix)` at `evaluation.iteration`, the confusion matrix and,
        where the tracker keeps artifacts, `scores.metrics_file`."""

    def finish_evaluation(self, failed: bool) -> None:
        """Close; a tracker run the evaluation opened ends as failed when `failed`."""

    # -- the events ------------------------------------------------------------------------------------------

    def on_fit_start(self, run: Run) -> None:
        error = None
        if run.ctx.is_main:
            try:
                self.start(run)
                self.started = True
            except SegtrainError as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - any failure to start is the user's setting, named by key
                error = f"{self.key}: cannot start recording: {first_line(exc)}"
        error = broadcast_object(error, run.ctx)  # every process stops, not only rank 0
        if error is not None:
            raise ConfigError(error)
        run.records.attach(self)

    def on_preempt(self, run: Run) -> None:
        self.status = "preempted"

    def on_fit_end(self, run: Run) -> None:
        self.status = "finished"
        if self.started and self in run.records.trackers:
            try:
                self.log_fit_end(run)
            except Exception as exc:  # noqa: BLE001 - the run is trained; a tracker's failure is a warning
                log.warning("%s could not record the end of the run: %s", self.key, first_line(exc))

    def on_close(self, run: Run) -> None:
        if not self.started:
            return
        self.started = False
        try:
            self.finish(run)
        except Exception as exc:  # noqa: BLE001 - closing a tracker never hides how the run ended
            log.warning("%s could not close its run: %s", self.key, first_line(exc))

    def state_dict(self) -> dict:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str) and RUN_ID.fullmatch(run_id):
            self.run_id = run_id
        elif run_id is not None:
            log.warning("%s: the checkpoint's tracker run id is not usable; a new tracker run is started", self.key)


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set for the duration (a tracker's start: a short timeout, no retries)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
