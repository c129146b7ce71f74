"""trainer.nan_policy: a non-finite loss stops the run (stop) or drops the step (skip).

With `stop`, the first bad iteration is remembered on the device, so a step costs no host
synchronisation; with `skip`, the step decides on the device (segtrain.engine.step) and the skipped
steps are counted there. Both are read (the run stopped, the skipped steps reported and checked against
trainer.max_skipped_steps) before anything reports or saves the state:
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
        self.skipped: torch.Tensor | None = None  # steps skipped since the last reading (nan_policy=skip)
        self.last_skipped: torch.Tensor | None = None  # the latest skipped iteration (0: none yet)

    def on_fit_start(self, run: Run) -> None:
        zero = torch.zeros((), dtype=torch.long, device=run.runtime.device)
        self.first_bad, self.skipped, self.last_skipped = zero, zero.clone(), zero.clone()

    def on_step_end(self, run: Run, result: StepResult) -> None:
        iteration = run.state.iteration
        # A skipped step left no trace: only an applied non-finite step poisons the weights.
        applied_bad = ~result.finite & ~result.skipped
        self.first_bad = torch.where((self.first_bad == 0) & applied_bad, iteration, self.first_bad)
        if run.cfg.trainer.nan_policy == "skip":  # the flag is the same on every process (decided together)
            self.skipped += result.skipped
            self.last_skipped = torch.where(result.skipped, iteration, self.last_skipped)

    def check(self, run: Run) -> None:
        """Stop if any process saw a non-finite loss since the start, and count the skipped steps since the
        last check (one host synchronisation for both)."""
        worst = self.first_bad.clone()
        if run.ctx.enabled:  # a NaN on any rank poisons every rank's weights through the gradient average
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        bad, skipped, last = torch.stack([worst, self.skipped, self.last_skipped]).tolist()
        if skipped:
            self.skipped.zero_()
            self.report_skipped(run, skipped, last)
        if bad:
            raise TrainingStopped(
                f"non-finite loss at iteration {bad} (lr {run.step.lr(bad):.6g}); trainer.nan_policy=stop. Last "
                f"good checkpoint: {run.last_good_checkpoint()}. Lower optimizer.lr, add schedule.warmup_iters, "
                "check the data with `segtrain data check`, or set trainer.nan_policy=skip"
            )

    def report_skipped(self, run: Run, skipped: int, last: int) -> None:
        run.state.skipped_steps += skipped
        limit = run.cfg.trainer.max_skipped_steps
        lr = run.step.lr(last)
        log.warning("non-finite loss: %d steps skipped since the last report, the latest at iteration %d (lr %.6g); "
                    "%d of at most %d", skipped, last, lr, run.state.skipped_steps, limit)
        run.records.scalars(run.state.iteration, {"train/skipped_steps": run.state.skipped_steps})
        if run.state.skipped_steps > limit:
            raise TrainingStopped(
                f"{run.state.skipped_steps} steps had a non-finite loss (trainer.max_skipped_steps={limit}); last "
                f"at iteration {last} (lr {lr:.6g}). Last good checkpoint: {run.last_good_checkpoint()}. Lower "
                "optimizer.lr or check the data (segtrain data check)"
            )

    def on_log(self, run: Run, result: StepResult) -> None:
        self.check(run)

    def on_validation(self, run: Run) -> None:
        self.check(run)

    def on_checkpoint(self, run: Run) -> None:
        self.check(run)

    def on_preempt(self, run: Run) -> None:
        self.check(run)
