"""`segtrain eval`'s experiment trackers: the scores of a checkpoint recorded where its training was.

    segtrain eval ckpt=outputs/<run>/checkpoints/best.pt logger=[tensorboard,mlflow] \\
        logger.mlflow.tracking_uri=sqlite:///mlflow.db

eval composes the `logger` group as training does (conf/logger/, default tensorboard), from the command line
only: the checkpoint's stored config is untrusted and names no tracker here. Each tracker records, at the
checkpoint's iteration, the scalars `eval/<protocol>/mIoU`, `pixel_acc`, `mean_acc` and `iou/<class>`
(`<protocol>` as the evaluation's directory name: `shapes-val-whole-flip`), the confusion-matrix image and,
where the tracker keeps artifacts, metrics.json. TensorBoard keeps the tags it always had (`eval/mIoU`,
`eval_iou/<class>`) in the directory `<training run>/eval/<protocol>`, which names the protocol.

A tracker whose run id is in the checkpoint (MLflow, W&B: `callbacks.<class>.run_id`, saved by training)
records into that run, so the evaluation appears beside its training; the server is the command line's.
Otherwise a new tracker run is named after the evaluation's run directory. As in training, a tracker that
cannot start stops the command with one line naming its key, before any image is evaluated; a failure
while recording is a warning (metrics.json is written by then). Under torchrun only rank 0 records.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from omegaconf import DictConfig

from segtrain.engine.callbacks import Tracker, configured_trackers
from segtrain.engine.distributed import DistContext, broadcast_object
from segtrain.errors import ConfigError, SegtrainError, first_line

log = logging.getLogger("segtrain.eval")


@dataclass(frozen=True)
class Evaluation:
    """One `segtrain eval` as its trackers see it."""

    run_dir: Path  # the evaluation's own run directory: a new tracker run is named after it
    protocol: str  # what was evaluated (segtrain.commands.eval.protocol_name): the tags' `eval/<protocol>/`
    iteration: int  # the checkpoint's iteration: the step of every scalar
    checkpoint: Path
    training_run: Path | None  # the training run directory the checkpoint belongs to, if any

    @property
    def prefix(self) -> str:
        return f"eval/{self.protocol}"


@dataclass(frozen=True)
class EvalScores:
    """What an evaluation measured, once metrics.json is written."""

    metrics: dict[str, Any]  # miou, pixel_acc, mean_acc, iou (per class, NaN for a class never seen)
    class_names: list[str]
    matrix_image: np.ndarray  # the confusion matrix drawn, HxWx3 uint8 RGB (confusion_matrix.png)
    table: str  # the per-class table as the console shows it
    metrics_file: Path  # metrics.json

    def scalars(self, prefix: str) -> dict[str, float]:
        """`<prefix>/mIoU`, `/pixel_acc`, `/mean_acc` and `/iou/<class>` (a class absent from the split has none)."""
        values = {f"{prefix}/mIoU": self.metrics["miou"], f"{prefix}/pixel_acc": self.metrics["pixel_acc"],
                  f"{prefix}/mean_acc": self.metrics["mean_acc"]}
        values.update({f"{prefix}/iou/{name}": iou for name, iou in zip(self.class_names, self.metrics["iou"])
                       if not math.isnan(iou)})
        return {tag: float(value) for tag, value in values.items()}


class EvalRecorder:
    """The evaluation's trackers: `start` before the first image, `record` once the metrics are written, closed
    on leaving the `with` block (a tracker run the evaluation opened ends as failed when it raised)."""

    def __init__(self, trackers: list[Tracker], ctx: DistContext) -> None:
        self.trackers = trackers
        self.ctx = ctx
        self.started: list[Tracker] = []

    @classmethod
    def from_config(cls, composed: DictConfig, tensorboard: bool, ctx: DistContext) -> EvalRecorder:
        """The command line's `logger` mapping; `tensorboard`: the evaluation's logging.tensorboard."""
        return cls(configured_trackers(composed, tensorboard=tensorboard), ctx)

    def start(self, evaluation: Evaluation, checkpoint_state: dict) -> None:
        """Rank 0 opens every tracker (continuing the checkpoint's tracker run where it has one); a failure stops
        every process with one line naming the tracker's key."""
        error = None
        if self.ctx.is_main:
            saved = checkpoint_state.get("callbacks")
            for tracker in self.trackers:
                own = saved.get(type(tracker).__qualname__) if isinstance(saved, dict) else None
                if isinstance(own, dict):
                    tracker.load_state_dict(own)
                try:
                    tracker.start_evaluation(evaluation)
                except SegtrainError as exc:
                    error = str(exc)
                except Exception as exc:  # noqa: BLE001 - any failure to start is the user's setting, named by key
                    error = f"{tracker.key}: cannot start recording: {first_line(exc)}"
                if error is not None:
                    break
                self.started.append(tracker)
        error = broadcast_object(error, self.ctx)
        if error is not None:
            self.close(failed=True)
            raise ConfigError(error)

    def record(self, evaluation: Evaluation, scores: EvalScores) -> None:
        for tracker in list(self.started):
            try:
                tracker.record_evaluation(evaluation, scores)
            except Exception as exc:  # noqa: BLE001 - the metrics are written; a tracker's failure is a warning
                log.warning("%s could not record the evaluation: %s", tracker.key, first_line(exc))

    def close(self, failed: bool) -> None:
        for tracker in reversed(self.started):
            try:
                tracker.finish_evaluation(failed)
            except Exception as exc:  # noqa: BLE001 - closing a tracker never hides how the evaluation ended
                log.warning("%s could not close its run: %s", tracker.key, first_line(exc))
        self.started = []

    def __enter__(self) -> EvalRecorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(failed=exc is not None)
