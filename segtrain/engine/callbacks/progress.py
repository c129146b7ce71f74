"""Progress: the bar on a terminal, and a loss / learning-rate / speed line every logging.interval.

The line is the loop's one regular host synchronisation (the loss, and with trainer.clip_grad_norm the
gradients' norm before clipping, train/grad_norm, are read). Its ETA counts the validations and
checkpoints still due at their mean duration so far (before the first validation it names how many
are due instead of guessing). It always reaches
train.log; on the console the bar shows it instead when there is one. Speed counts training steps
only: the loop leaves validation and checkpoint writing out of `run.throughput`.
"""

from __future__ import annotations

import contextlib
import logging

from tqdm import tqdm

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.distributed import all_reduce_sum
from segtrain.engine.logger import (
    PROGRESS_RECORD,
    Throughput,
    console_above_bar,
    format_remaining,
    remaining_seconds,
)
from segtrain.engine.run import Run
from segtrain.engine.step import StepResult
from segtrain.progress import progress_enabled

log = logging.getLogger("segtrain.train")


class ProgressLogger(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.console = contextlib.ExitStack()

    def on_fit_start(self, run: Run) -> None:
        shown = progress_enabled(run.cfg.logging.progress) and run.ctx.is_main
        self.bar = tqdm(total=run.max_iters, initial=run.state.iteration, desc="train", unit="it",
                        disable=not shown, dynamic_ncols=True)
        self.console.enter_context(console_above_bar(shown))
        run.throughput = Throughput(run.state.iteration)

    def on_step_end(self, run: Run, result: StepResult) -> None:
        self.bar.update(1)

    def on_log(self, run: Run, result: StepResult) -> None:
        iteration, max_iters = run.state.iteration, run.max_iters
        lr = run.step.lr(iteration)
        loss = float(all_reduce_sum(result.loss, run.ctx)) / run.ctx.world_size  # the global batch's loss
        rate = run.throughput.rate(iteration)  # over the iterations since the last line: the last may be short
        run.state.history.append({"iteration": iteration, "loss": loss, "lr": lr})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        intervals = {"validation": run.cfg.trainer.val_interval, "checkpoint": run.cfg.trainer.ckpt_interval}
        eta = format_remaining(*remaining_seconds(iteration, max_iters, rate, intervals, run.throughput))
        log.info("iter %d/%d: loss %.4f, lr %.6g, %.2f it/s, eta %s", iteration, max_iters, loss, lr, rate, eta,
                 extra={PROGRESS_RECORD: True})
        values = {"train/loss": loss, "train/lr": lr, "train/iter_per_s": rate}
        if result.grad_norm is not None:  # the same on every process: DDP averaged the gradients
            values["train/grad_norm"] = float(result.grad_norm)
        if run.cfg.data.on_error == "skip":
            values["data/skipped_samples"] = run.state.skipped_samples
        run.records.scalars(iteration, values)

    def on_close(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()
        self.console.close()
