"""The callback contract: what the training loop calls, when, and in which order.

`Trainer.fit` calls these events on every callback, in list order (segtrain's own first, then the
config's `callbacks`):

    on_fit_start(run)               once, before the first step (after resume)
    on_step_end(run, result)        after every optimizer step; run.state.iteration is the step's
    on_log(run, result)             every logging.interval steps and at the last
    on_validation(run)              every trainer.val_interval steps and at the last; the validation
                                    callback fills run.validation, which later callbacks read
    on_checkpoint(run)              every trainer.ckpt_interval steps and at the last; run.last_checkpoint
                                    is the file written (rank 0)
    on_iteration_end(run)           after all of the above, every step
    on_preempt(run)                 when every process agreed to stop on SIGTERM/SIGINT
    on_fit_end(run)                 after the last step
    on_close(run)                   always, after the end or any failure (release what on_fit_start took)

`run` (segtrain.engine.run.Run) holds the model, the step, the datasets, the records and the
`TrainState`; a callback keeps its own state in its own attributes. Every process calls every
event: a callback that writes files checks `run.ctx.is_main`, and one that makes a collective
call (all-reduce) must make it on every process.

A callback ends a run early by setting `run.stop_reason` (a sentence for the log; the same on every
process) in on_fit_start, on_step_end, on_log or on_validation: the loop then fires on_checkpoint at
that iteration (so last.pt is the state it stopped in), on_iteration_end, and ends as a normal finish
(on_fit_end: result.json). Set in on_checkpoint or on_iteration_end, the run ends after on_iteration_end
all the same, with the latest periodic checkpoint as last.pt.

A callback whose decisions depend on the past (early stopping's patience) returns that state from
`state_dict()` (plain numbers, strings, lists and dicts); it is saved in every checkpoint and given
back through `load_state_dict()` on resume, before `on_fit_start`, so a resumed run decides exactly
as the uninterrupted one. A checkpoint is untrusted data: `load_state_dict` checks what it reads.

A signal during validation ends it at the next batch (segtrain.engine.callbacks.validation): the
validation callback sets `run.validation_interrupted` and the callbacks after it are not called for
that event (`run.validation` is still the previous one). The resumed run fires on_validation for
that iteration again right after on_fit_start.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segtrain.engine.run import Run
    from segtrain.engine.step import StepResult


class Callback:
    """Does nothing at every event; a callback overrides the events it needs."""

    def on_fit_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, result: StepResult) -> None:
        pass

    def on_log(self, run: Run, result: StepResult) -> None:
        pass

    def on_validation(self, run: Run) -> None:
        pass

    def on_checkpoint(self, run: Run) -> None:
        pass

    def on_iteration_end(self, run: Run) -> None:
        pass

    def on_preempt(self, run: Run) -> None:
        pass

    def on_fit_end(self, run: Run) -> None:
        pass

    def on_close(self, run: Run) -> None:
        pass

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this callback's decisions; empty: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """The state of `state_dict()` from a checkpoint (called before on_fit_start on resume)."""


class CallbackList(Callback):
    """Calls each event on every callback, in order. `on_close` reaches every callback even when one
    of them fails; the first failure is raised after all were called."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)

    def _each(self, event: str, *args: object) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    def on_fit_start(self, run: Run) -> None:
        self._each("on_fit_start", run)

    def on_step_end(self, run: Run, result: StepResult) -> None:
        self._each("on_step_end", run, result)

    def on_log(self, run: Run, result: StepResult) -> None:
        self._each("on_log", run, result)

    def on_validation(self, run: Run) -> None:
        run.validation_interrupted = False
        for callback in self.callbacks:
            callback.on_validation(run)
            if run.validation_interrupted:  # a signal cut it short: there is no outcome to act on
                break

    def on_checkpoint(self, run: Run) -> None:
        self._each("on_checkpoint", run)

    def on_iteration_end(self, run: Run) -> None:
        self._each("on_iteration_end", run)

    def on_preempt(self, run: Run) -> None:
        self._each("on_preempt", run)

    def on_fit_end(self, run: Run) -> None:
        self._each("on_fit_end", run)

    def _keys(self) -> list[str]:
        """A stable name per callback for the checkpoint: its class, numbered when it occurs twice."""
        keys, seen = [], {}
        for callback in self.callbacks:
            name = type(callback).__qualname__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    def state_dict(self) -> dict:
        states = {key: callback.state_dict() for key, callback in zip(self._keys(), self.callbacks)}
        return {key: state for key, state in states.items() if state}

    def load_state_dict(self, state: dict) -> None:
        for key, callback in zip(self._keys(), self.callbacks):
            if isinstance(state.get(key), dict):
                callback.load_state_dict(state[key])

    def on_close(self, run: Run) -> None:
        failure: BaseException | None = None
        for callback in reversed(self.callbacks):  # released in the reverse order of on_fit_start
            try:
                callback.on_close(run)
            except BaseException as exc:  # noqa: BLE001 - every callback gets to release its resources
                failure = failure or exc
        if failure is not None:
            raise failure
