"""The run's records: metrics.jsonl and the trackers (`run.records`, segtrain.engine.logger.RunLogger).

Callbacks put scalars into `run.records` as they produce them; this callback opens the records at
the start iteration (a resumed run cuts metrics.jsonl back to it; the trackers, started just before,
continue their own runs), gives the trackers the hyper-parameters and the config,
ends each iteration's metrics.jsonl line before a checkpoint can be taken of that iteration, and
writes result.json (what a sweep summary and the Optuna sweeper read) at the end.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.hparams import METRIC_TAGS, run_hparams
from segtrain.engine.run import Run
from segtrain.engine.sweep import write_result


class MetricWriters(Callback):
    def __init__(self) -> None:
        self.hparams: dict[str, float | str] = {}

    def on_fit_start(self, run: Run) -> None:
        start = run.state.iteration
        run.records.open(start)
        self.hparams = run_hparams(run.cfg, run.info.overrides, run.info.choices)
        run.records.start_session(self.hparams, list(METRIC_TAGS), OmegaConf.to_yaml(run.cfg, resolve=True), start)

    def on_checkpoint(self, run: Run) -> None:
        run.records.end_step()  # the line of the checkpointed iteration is on disk before the checkpoint

    def on_iteration_end(self, run: Run) -> None:
        run.records.end_step()

    def on_fit_end(self, run: Run) -> None:
        s = run.state
        run.records.end_session(s.iteration)
        if run.ctx.is_main:
            write_result(run.run_dir, {
                "best_miou": s.best_miou, "best_iteration": s.best_iteration, "final_miou": s.last_miou,
                "iteration": s.iteration, "max_iters": run.max_iters, "job": run.info.job,
                "overrides": run.info.overrides, "hparams": self.hparams, "run_dir": str(run.run_dir),
                # data.on_error=skip: training samples replaced, validation samples the final mIoU leaves out
                "skipped_samples": s.skipped_samples,
                "skipped_val_samples": len(run.validation.skipped) if run.validation is not None else 0,
                "skipped_steps": s.skipped_steps})

    def on_close(self, run: Run) -> None:
        run.records.close()  # flushed on any exit
