"""Early stopping: end the run when validation mIoU stops improving.

`patience` counts validations (trainer.val_interval apart) whose mIoU is not better than the best
so far by more than `min_delta`. When it runs out, the callback asks the loop to stop
(`run.stop_reason`): the loop checkpoints that iteration (last.pt) and finishes as a normal run
(result.json, exit 0). Its state goes into every checkpoint, so a resumed run stops at the same
iteration as an uninterrupted one; a run resumed from the checkpoint where it stopped stays stopped
(unless `patience` was raised).

    segtrain train callbacks=early_stopping callbacks.early_stopping.patience=3
"""

from __future__ import annotations

import logging
import math

from segtrain.display import percent
from segtrain.engine.callbacks.base import Callback
from segtrain.engine.run import Run
from segtrain.errors import WeightsError

log = logging.getLogger("segtrain.train")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class EarlyStopping(Callback):
    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1 (validations without an mIoU improvement), "
                             f"got {patience!r}")
        if not _is_real(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0 (an mIoU difference, e.g. 0.001), got {min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best: float | None = None  # the best mIoU that counted as an improvement
        self.bad_validations = 0  # validations since then without one

    def on_fit_start(self, run: Run) -> None:
        if self.bad_validations >= self.patience:  # resumed from the checkpoint where it stopped
            self.request_stop(run)

    def on_validation(self, run: Run) -> None:
        miou = float(run.validation.metrics["miou"])
        if self.best is None or miou > self.best + self.min_delta:
            self.best, self.bad_validations = miou, 0
        else:  # a NaN mIoU (no class present) is no improvement either
            self.bad_validations += 1
        if self.bad_validations >= self.patience:
            self.request_stop(run)

    def request_stop(self, run: Run) -> None:
        run.stop_reason = (f"early stopping: {self.bad_validations} validations without an mIoU improvement of "
                           f"more than {percent(self.min_delta)} points (min_delta={self.min_delta:g}) over the best, "
                           f"{percent(self.best)}% "
                           f"(callbacks.early_stopping.patience={self.patience})")

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        best, bad = state.get("best"), state.get("bad_validations")
        if (best is not None and not _is_real(best)) or isinstance(bad, bool) or not isinstance(bad, int) or bad < 0:
            raise WeightsError(f"the checkpoint's early stopping state is not valid ({state!r}): resume from another "
                               "checkpoint, or without early stopping (callbacks.early_stopping=null)")
        self.best, self.bad_validations = None if best is None else float(best), bad
