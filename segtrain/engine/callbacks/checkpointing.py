"""Periodic checkpoints (iter_N.pt, last.pt) every trainer.ckpt_interval steps, at the last step and
on preemption; the newest trainer.keep_last are kept. Only rank 0 writes."""

from __future__ import annotations

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.checkpoint import save_periodic
from segtrain.engine.run import Run, checkpoint_state


class PeriodicCheckpoint(Callback):
    def __init__(self) -> None:
        self.saved_at = -1  # the iteration of the last checkpoint written by this run

    def save(self, run: Run) -> None:
        if run.ctx.is_main:
            run.last_checkpoint = save_periodic(checkpoint_state(run), run.ckpt_dir, run.cfg.trainer.keep_last,
                                                run.state.iteration)
        self.saved_at = run.state.iteration

    def on_checkpoint(self, run: Run) -> None:
        self.save(run)

    def on_preempt(self, run: Run) -> None:
        if self.saved_at != run.state.iteration:  # the state to resume from is this step's
            self.save(run)
