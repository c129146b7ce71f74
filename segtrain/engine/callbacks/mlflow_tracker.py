"""logger=mlflow: an MLflow run per training run (pip install -e '.[mlflow]').

    segtrain train logger=[tensorboard,mlflow] logger.mlflow.tracking_uri=http://mlflow.internal:5000
    segtrain train logger=mlflow logger.mlflow.tracking_uri=sqlite:///mlflow.db   # a local database

Records every scalar as a metric at its iteration (class names become metric-safe: `val_iou/traffic light`),
the hyper-parameters as params, the composed config as the artifact `config.yaml`, validation panels under
`val_images/`, and with log_best_checkpoint=true best.pt under `checkpoints/` at the end.

Resume: the MLflow run id is saved in every checkpoint and the resumed run continues that run. MLflow
keeps every point it was given (there is no deleting a metric's history), so the points a killed process
logged after its last checkpoint stay, and the resumed run skips the iterations a metric already has:
every logged iteration is in the history exactly once. Params already logged keep their first value
(MLflow refuses to change one; a resumed run with, say, a longer trainer.max_iters is said in the log).

`segtrain eval logger=mlflow` records into the checkpoint's MLflow run when it is on the command line's
tracking URI (its status stays as training left it), else into a new run named after the evaluation's
directory: the metrics `eval/<protocol>/...` at the checkpoint's iteration, and the artifacts
`eval/<protocol>/<iteration>/confusion_matrix.png` and `metrics.json`.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segtrain.engine.callbacks.tracker import Tracker, environment, tracker_run_name
from segtrain.engine.run import Run

if TYPE_CHECKING:
    from segtrain.engine.eval_tracking import EvalScores, Evaluation

log = logging.getLogger("segtrain.train")

NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's metric and param names: these characters only
MAX_PARAM_LENGTH = 6000
STATUS = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
# At start, one try with a short timeout: a server that is down stops the run in seconds, not after minutes of
# retries. Later calls use MLflow's own retries.
START_ENVIRONMENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def metric_name(tag: str) -> str:
    return NOT_IN_A_NAME.sub("_", tag)


class MlflowTracker(Tracker):
    name = "mlflow"
    package = "mlflow"
    extra = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "segtrain", run_name: str | None = None,
                 log_best_checkpoint: bool = False) -> None:
        super().__init__()
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.log_best_checkpoint = log_best_checkpoint
        self.client: Any = None  # mlflow.tracking.MlflowClient once started
        self.last_step: dict[str, int] = {}  # a resumed run: the newest iteration each metric already has
        self.opened_by_eval = False  # segtrain eval created this run (and so ends it)

    def start(self, run: Run) -> None:
        from mlflow.tracking import MlflowClient

        with environment(**START_ENVIRONMENT):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment_id = self._experiment_id()
            if self.run_id is not None and self._continue(self.run_id):
                return
            tags = {"segtrain.run_dir": str(run.run_dir.resolve())}
            if run.info.job is not None:
                tags["segtrain.job"] = str(run.info.job)
            self._create(experiment_id, run.run_dir, tags)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        return found.experiment_id if found is not None else self.client.create_experiment(self.experiment)

    def _create(self, experiment_id: str, run_dir: Path, tags: dict[str, str]) -> None:
        created = self.client.create_run(experiment_id, run_name=self.run_name or tracker_run_name(run_dir), tags=tags)
        self.run_id = created.info.run_id
        log.info("%s: MLflow run %s in experiment '%s' at %s", self.key, self.run_id, self.experiment,
                 self.client.tracking_uri)

    def _usable(self, run_id: str) -> Any:
        """The checkpoint's run, or None (a new run is started) when it no longer exists."""
        try:
            previous = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted or from another server: start afresh, say so
            log.warning("%s: MLflow run %s of the checkpoint is not on %s; a new run is started", self.key, run_id,
                        self.client.tracking_uri)
            return None
        if previous.info.lifecycle_stage == "deleted":
            log.warning("%s: MLflow run %s of the checkpoint was deleted; a new run is started", self.key, run_id)
            return None
        return previous

    def _continue(self, run_id: str) -> bool:
        """Reopen the checkpoint's run; False (a new run is started) when it no longer exists."""
        previous = self._usable(run_id)
        if previous is None:
            return False
        self.last_step = {key: max(m.step for m in self.client.get_metric_history(run_id, key))
                          for key in previous.data.metrics}
        self.client.update_run(run_id, status="RUNNING")
        log.info("%s: continuing MLflow run %s at %s", self.key, run_id, self.client.tracking_uri)
        return True

    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, iteration) for name, value in
                   ((metric_name(tag), value) for tag, value in values.items())
                   if iteration > self.last_step.get(name, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, tag: str, image: Any, iteration: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{tag}/{iteration:07d}.png")

    def log_run_info(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                     iteration: int) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        params, kept = [], []
        for key, value in hparams.items():
            name, text = metric_name(key), str(value)[:MAX_PARAM_LENGTH]
            if name not in logged:
                params.append(Param(name, text))
            elif logged[name] != text:
                kept.append(f"{name}={text} (logged: {logged[name]})")
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        if kept:
            log.info("%s: params keep their first value (MLflow refuses changes): %s", self.key, "; ".join(kept))
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log_fit_end(self, run: Run) -> None:
        s = run.state
        if s.best_miou >= 0:
            self.client.set_tag(self.run_id, "best_iteration", str(s.best_iteration))
        best = run.ckpt_dir / "best.pt"
        if self.log_best_checkpoint and best.is_file():
            self.client.log_artifact(self.run_id, str(best), "checkpoints")

    def finish(self, run: Run) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, STATUS[self.status])

    def start_evaluation(self, evaluation: Evaluation) -> None:
        from mlflow.tracking import MlflowClient

        with environment(**START_ENVIRONMENT):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            if self.run_id is not None and self._usable(self.run_id) is not None:
                log.info("%s: recording the evaluation into MLflow run %s (the checkpoint's) at %s", self.key,
                         self.run_id, self.client.tracking_uri)
                return
            tags = {"segtrain.run_dir": str(evaluation.run_dir.resolve()),
                    "segtrain.checkpoint": str(evaluation.checkpoint.resolve())}
            self._create(self._experiment_id(), evaluation.run_dir, tags)
            self.opened_by_eval = True

    def record_evaluation(self, evaluation: Evaluation, scores: EvalScores) -> None:
        self.log_scalars(evaluation.iteration, scores.scalars(evaluation.prefix))
        folder = f"{evaluation.prefix}/{evaluation.iteration:07d}"
        self.client.log_image(self.run_id, scores.matrix_image, artifact_file=f"{folder}/confusion_matrix.png")
        self.client.log_artifact(self.run_id, str(scores.metrics_file), folder)

    def finish_evaluation(self, failed: bool) -> None:
        if self.opened_by_eval and self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, STATUS["failed" if failed else "finished"])
