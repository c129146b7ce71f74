"""trainer.nan_policy: a non-finite loss stops the run (stop) or drops the step (skip).

With `stop`, the first bad iteration is remembered on the device, so a step costs no host
synchronisation; it is read (and the run stopped) before anything reports or saves the state:
at the log interval, at validation, at a checkpoint and on preemption. This callback comes first
in the list so that nothing after it sees a poisoned state.
"""

from __future__ import annotations

import logging

import torch

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.run import Run
from segtrain.engine.step import StepResult
from segtrain.errors import TrainingStopped

log = logging.getLogger("segtrain.train")


class NonFiniteGuard(Callback):
    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # 0, or the first iteration with a non-finite loss

    def on_fit_start(self, run: Run) -> None:
        self.first_bad = torch.zeros((), dtype=torch.long, device=run.runtime.device)

    def on_step_end(self, run: Run, result: StepResult) -> None:
        iteration = run.state.iteration
        if not result.skipped:
            self.first_bad = torch.where((self.first_bad == 0) & ~result.finite, iteration, self.first_bad)
            return
        run.state.skipped_steps += 1
        limit = run.cfg.trainer.max_skipped_steps
        lr = run.step.lr(iteration)
        log.warning("non-finite loss at iteration %d (lr %.6g): step skipped (%d of at most %d)",
                    iteration, lr, run.state.skipped_steps, limit)
        run.records.scalars(iteration, {"train/skipped_steps": run.state.skipped_steps})
        if run.state.skipped_steps > limit:
            raise TrainingStopped(
                f"{run.state.skipped_steps} steps had a non-finite loss (trainer.max_skipped_steps={limit}); last "
                f"at iteration {iteration} (lr {lr:.6g}). Last good checkpoint: {run.last_good_checkpoint()}. Lower "
                "optimizer.lr or check the data (segtrain data check)"
            )

    def check(self, run: Run) -> None:
        """Stop if any process saw a non-finite loss since the start (one host synchronisation)."""
        worst = self.first_bad.clone()
        if run.ctx.enabled:  # a NaN on any rank poisons every rank's weights through the gradient average
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        bad = int(worst)
        if bad:
            raise TrainingStopped(
                f"non-finite loss at iteration {bad} (lr {run.step.lr(bad):.6g}); trainer.nan_policy=stop. Last "
                f"good checkpoint: {run.last_good_checkpoint()}. Lower optimizer.lr, add schedule.warmup_iters, "
                "check the data with `segtrain data check`, or set trainer.nan_policy=skip"
            )

    def on_log(self, run: Run, result: StepResult) -> None:
        self.check(run)

    def on_validation(self, run: Run) -> None:
        self.check(run)

    def on_checkpoint(self, run: Run) -> None:
        self.check(run)

    def on_preempt(self, run: Run) -> None:
        self.check(run)
