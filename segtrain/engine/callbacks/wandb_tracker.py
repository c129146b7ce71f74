"""logger=wandb: a Weights & Biases run per training run (pip install -e '.[wandb]').

    segtrain train logger=[tensorboard,wandb] logger.wandb.project=my-project logger.wandb.entity=my-team
    WANDB_MODE=offline segtrain train logger=wandb      # no account needed; `wandb sync` uploads it later

Records every scalar at its iteration (W&B's step is segtrain's iteration), the hyper-parameters as the
run's config, the composed config as the file `segtrain_config.yaml`, validation panels as images, the best
mIoU and its iteration in the run's summary, and with log_best_checkpoint=true best.pt as a `model`
artifact. W&B's files go under the run directory (`<run>/wandb/`) unless logger.wandb.dir or WANDB_DIR
says otherwise.

Resume: the W&B run id is saved in every checkpoint and the resumed run continues that run
(resume="allow"). W&B refuses a step below the run's current one, so the iterations a killed process
logged after its last checkpoint stay and are not logged again.

`segtrain eval logger=wandb` resumes the checkpoint's W&B run (the project and mode are the command line's),
else starts a run named after the evaluation's directory. W&B's step only grows and training has gone past
the checkpoint's iteration, so the scalars `eval/<protocol>/...` are plotted against their own x-axis
`eval/iteration` (the checkpoint's iteration), with the confusion matrix as the image
`eval/<protocol>/confusion_matrix` and metrics.json as an `evaluation` artifact.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segtrain.engine.callbacks.tracker import Tracker, tracker_run_name
from segtrain.engine.run import Run
from segtrain.errors import ConfigError

if TYPE_CHECKING:
    from segtrain.engine.eval_tracking import EvalScores, Evaluation

log = logging.getLogger("segtrain.train")

MODES = ("online", "offline", "disabled")
NOT_IN_AN_ARTIFACT_NAME = re.compile(r"[^A-Za-z0-9_.-]")
EVAL_STEP = "eval/iteration"  # the x-axis of eval's scalars


class WandbTracker(Tracker):
    name = "wandb"
    package = "wandb"
    extra = "wandb"

    def __init__(self, project: str = "segtrain", entity: str | None = None, run_name: str | None = None,
                 mode: str | None = None, dir: str | None = None, log_best_checkpoint: bool = False) -> None:
        super().__init__()
        if mode is not None and mode not in MODES:
            raise ConfigError(f"{self.key}.mode={mode!r}: choose one of {', '.join(MODES)} (or null: W&B's own "
                              "setting, WANDB_MODE)")
        self.project, self.entity, self.run_name, self.mode, self.dir = project, entity, run_name, mode, dir
        self.log_best_checkpoint = log_best_checkpoint
        self.wandb_run: Any = None
        self.first_step = 0  # a resumed run: W&B already has the steps below this one

    def start(self, run: Run) -> None:
        self._init(run.run_dir)
        if self.run_id is not None:
            self.first_step = int(self.wandb_run.step or 0)
            log.info("%s: continuing W&B run %s from step %d", self.key, self.run_id, self.first_step)
        self.run_id = self.wandb_run.id
        if self.run_id is not None and self.first_step == 0:
            log.info("%s: W&B run %s (project %s, %s)", self.key, self.run_id, self.project,
                     self.wandb_run.settings.mode)

    def _init(self, run_dir: Path, named: bool = True) -> None:
        """`named`: give the run its name and notes (an evaluation resuming its training's run keeps them)."""
        import wandb

        folder = self.dir or os.environ.get("WANDB_DIR") or str(run_dir)
        Path(folder).mkdir(parents=True, exist_ok=True)
        name = (self.run_name or tracker_run_name(run_dir)) if named else None
        self.wandb_run = wandb.init(
            project=self.project, entity=self.entity, name=name,
            id=self.run_id, resume="allow", mode=self.mode, dir=folder,
            notes=f"segtrain run directory {run_dir.resolve()}" if named else None,
            settings=wandb.Settings(console="off"),  # train.log already has the console; W&B leaves stdout alone
        )

    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        if iteration >= self.first_step:
            self.wandb_run.log(values, step=iteration)

    def log_image(self, tag: str, image: Any, iteration: int) -> None:
        import wandb

        if iteration >= self.first_step:
            self.wandb_run.log({tag: wandb.Image(image, caption=f"iteration {iteration}")}, step=iteration)

    def log_run_info(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                     iteration: int) -> None:
        self.wandb_run.config.update(hparams, allow_val_change=True)
        path = Path(self.wandb_run.dir) / "segtrain_config.yaml"
        path.write_text(config_yaml, encoding="utf-8")
        self.wandb_run.save(str(path), base_path=self.wandb_run.dir, policy="now")

    def log_fit_end(self, run: Run) -> None:
        import wandb

        s = run.state
        self.wandb_run.summary.update({"best_mIoU": s.best_miou, "best_iteration": s.best_iteration,
                                       "final_mIoU": s.last_miou})
        best = run.ckpt_dir / "best.pt"
        if self.log_best_checkpoint and best.is_file():
            artifact = wandb.Artifact(f"best-{self.run_id}", type="model",
                                      metadata={"mIoU": s.best_miou, "iteration": s.best_iteration})
            artifact.add_file(str(best))
            self.wandb_run.log_artifact(artifact)

    def finish(self, run: Run) -> None:
        if self.wandb_run is None:
            return
        if self.status == "preempted":
            self.wandb_run.mark_preempting()
        self.wandb_run.finish(exit_code=0 if self.status == "finished" else 1)
        self.wandb_run = None

    def start_evaluation(self, evaluation: Evaluation) -> None:
        resumed = self.run_id
        self._init(evaluation.run_dir, named=resumed is None)
        self.run_id = self.wandb_run.id
        log.info("%s: recording the evaluation into W&B run %s%s", self.key, self.run_id,
                 " (the checkpoint's)" if resumed == self.run_id else "")

    def record_evaluation(self, evaluation: Evaluation, scores: EvalScores) -> None:
        import wandb

        self.wandb_run.define_metric(EVAL_STEP)
        self.wandb_run.define_metric(f"{evaluation.prefix}/*", step_metric=EVAL_STEP)
        self.wandb_run.log({**scores.scalars(evaluation.prefix), EVAL_STEP: evaluation.iteration,
                            f"{evaluation.prefix}/confusion_matrix": wandb.Image(
                                scores.matrix_image, caption=f"iteration {evaluation.iteration}")})
        name = NOT_IN_AN_ARTIFACT_NAME.sub("_", f"eval-{self.run_id}-{evaluation.protocol}")
        artifact = wandb.Artifact(name, type="evaluation", metadata={"iteration": evaluation.iteration,
                                                                     "mIoU": scores.metrics["miou"]})
        artifact.add_file(str(scores.metrics_file))
        self.wandb_run.log_artifact(artifact)

    def finish_evaluation(self, failed: bool) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
