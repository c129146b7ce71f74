"""logger=tensorboard (the default): TensorBoard events in the run directory.

Scalars under their tags, validation panels under `val_images/<k>`, the config as text, and the
hyper-parameters for the HParams tab in the run's own event file (not a sub-run, as
`SummaryWriter.add_hparams` would make). A resumed run hides the events after its checkpoint's
iteration (purge_step), so each point is shown once. `tensorboard --logdir <the run's parent>` shows
the run under its own name. `logging.tensorboard=false` switches it off too.

`segtrain eval` writes its events to `<training run>/eval/<protocol>` when the checkpoint is a training run's
(TensorBoard shows the evaluation as a run beside its training, named by its protocol), else to the
evaluation's own directory, with training's tag scheme: `eval/mIoU`, `eval/pixel_acc`, `eval/mean_acc`,
`eval_iou/<class>`, the per-class table as text and `eval/confusion_matrix`. Event files have names of their
own (time, host, pid): nothing already there is written over.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segtrain.engine.callbacks.tracker import Tracker
from segtrain.engine.run import Run

if TYPE_CHECKING:
    from segtrain.engine.eval_tracking import EvalScores, Evaluation

log = logging.getLogger("segtrain.eval")


def eval_events_dir(evaluation: Evaluation) -> Path:
    """`<training run>/eval/<protocol>` when there is a training run and it can be created, else the
    evaluation's own directory."""
    if evaluation.training_run is None:
        return evaluation.run_dir
    target = evaluation.training_run / "eval" / evaluation.protocol
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only run, or a file of the user's where the folder would go
        log.warning("TensorBoard events stay in %s: %s cannot be created (%s)", evaluation.run_dir, target, exc)
        return evaluation.run_dir
    log.info("TensorBoard events beside the training run: %s", target)
    return target


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self) -> None:
        super().__init__()
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter once started
        self.session_end: Any = None

    def start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir), purge_step=run.state.iteration + 1)

    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)

    def log_image(self, tag: str, image: Any, iteration: int) -> None:
        self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def log_run_info(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                     iteration: int) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        experiment, session_start, self.session_end = hparams_summaries(hparams, dict.fromkeys(metric_tags, 0.0))
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary, iteration)
        self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), iteration)

    def log_session_end(self, iteration: int) -> None:
        """Marks the HParams session as finished (a run stopped early shows as unfinished)."""
        if self.session_end is not None:
            self.writer.file_writer.add_summary(self.session_end, iteration)
            self.session_end = None

    def finish(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def start_evaluation(self, evaluation: Evaluation) -> None:
        pass  # the events are written at once when the scores are there: a failed evaluation leaves none

    def record_evaluation(self, evaluation: Evaluation, scores: EvalScores) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step, metrics = evaluation.iteration, scores.metrics
        with SummaryWriter(str(eval_events_dir(evaluation))) as writer:
            # The tags of training's validation (val/mIoU, val_iou/<class>) with eval/ in place of val/.
            for key, tag in (("miou", "eval/mIoU"), ("pixel_acc", "eval/pixel_acc"), ("mean_acc", "eval/mean_acc")):
                writer.add_scalar(tag, metrics[key], step)
            for name, iou in zip(scores.class_names, metrics["iou"]):
                if not math.isnan(iou):
                    writer.add_scalar(f"eval_iou/{name}", iou, step)
            writer.add_text("eval/per_class_iou", "    " + scores.table.replace("\n", "\n    "), step)
            writer.add_image("eval/confusion_matrix", scores.matrix_image, step, dataformats="HWC")

    def finish_evaluation(self, failed: bool) -> None:
        pass
