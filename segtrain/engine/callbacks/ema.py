"""trainer.ema_decay: the exponential moving average of the weights, updated after each applied step."""

from __future__ import annotations

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.run import Run
from segtrain.engine.step import StepResult


class EmaUpdate(Callback):
    """`run.ema` (segtrain.engine.ema.WeightEma) follows the weights; a skipped step leaves it alone."""

    def on_step_end(self, run: Run, result: StepResult) -> None:
        if run.ema is not None:
            run.ema.update(run.model, result.skipped)
