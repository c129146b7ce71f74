"""SIGTERM / SIGINT: finish the step, stop at the same step on every process, checkpoint, exit 128 + N.

The signal handler (segtrain.engine.preemption) is installed for the fit only. At the end of each
iteration the processes agree whether any of them was signalled (under torch.distributed one
iteration late, without blocking the step: segtrain.engine.preemption.FlagExchange); the loop then
fires on_preempt (the checkpoint callback writes the step's state) and raises `Preempted`.
"""

from __future__ import annotations

import signal

from segtrain.engine.callbacks.base import Callback
from segtrain.engine.preemption import FlagExchange, PreemptionHandler
from segtrain.engine.run import Run


class PreemptionStop(Callback):
    def __init__(self) -> None:
        self.handler: PreemptionHandler | None = None
        self.exchange: FlagExchange | None = None

    def on_fit_start(self, run: Run) -> None:
        self.handler = PreemptionHandler().__enter__()
        if run.ctx.enabled:  # every rank must stop at the same step
            self.exchange = FlagExchange()

    def on_iteration_end(self, run: Run) -> None:
        stop = self.handler.requested
        if self.exchange is not None:
            stop = self.exchange.exchange(stop)
        if stop and run.state.iteration < run.max_iters:
            run.stop_signal = self.handler.signum or signal.SIGTERM

    def on_close(self, run: Run) -> None:
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None
        if self.handler is not None:
            self.handler.__exit__(None, None, None)
            self.handler = None
