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
        run.preemption = self.handler
        if run.ctx.enabled:  # every rank must stop at the same step
            self.exchange = FlagExchange()

    def on_iteration_end(self, run: Run) -> None:
        stop = self.handler.requested
        if self.exchange is not None:
            # After a validation (which ended in a collective anyway) the answer is awaited, so a signal
            # that cut the validation short stops every rank at this iteration; otherwise one iteration late.
            validated = run.pending_validation == run.state.iteration or (
                run.validation is not None and run.validation.iteration == run.state.iteration)
            stop = self.exchange.exchange_now(stop) if validated else self.exchange.exchange(stop)
        # At the last iteration a run ends anyway, unless the signal cut its final validation short.
        if stop and (run.state.iteration < run.max_iters or run.pending_validation is not None):
            run.stop_signal = self.handler.signum or signal.SIGTERM

    def on_close(self, run: Run) -> None:
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None
        if self.handler is not None:
            self.handler.__exit__(None, None, None)
            self.handler = None
            run.preemption = None
