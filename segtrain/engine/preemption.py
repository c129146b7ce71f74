"""SIGTERM / SIGINT during training: finish the step (or the validation batch), checkpoint, exit with
128 + the signal number; during an evaluation: stop at the next batch, exit the same way.

Schedulers read 143 (SIGTERM) and 130 (SIGINT) as "terminated by a signal"; a SLURM job submitted
with `--requeue` and `--signal=TERM@120` is requeued and `resume=auto` continues it. A second
SIGINT (Ctrl-C twice) exits at once.

In a job of Hydra's submitit launcher (`hydra/launcher=submitit_slurm`), submitit's own signal
(SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL names another; SLURM sends it
`hydra.launcher.signal_delay_s` before the time limit, and on preemption where the cluster is set up
so) is caught too. After the checkpoint, `hand_over_to_launcher` gives the signal to the handler
submitit installed: rank 0 requeues the job (a time-out counts against
`hydra.launcher.max_num_timeout`), and the requeued job runs the same sweep job in the same job
directory, where `resume=auto` continues it.

Under torch.distributed every process must stop at the same iteration. `FlagExchange` sums the
processes' flags without blocking a step: the all-reduce started at the end of iteration i runs in
the background and is read at the end of iteration i + 1, when it has long finished; every process
reads the same sum at the same iteration, so all stop after i + 1 (one step later than a blocking
exchange would). The flag lives in host memory, exchanged over a gloo group, so reading it never
waits for the device (an NCCL all-reduce of a GPU flag would make the host wait for the step's kernels).
After a validation the answer is awaited instead (`exchange_now`): the processes have just
synchronised, and a signal that cut the validation short must stop every process at that iteration.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist

from segtrain.engine.distributed import in_launcher_job

log = logging.getLogger("segtrain.train")


def preemption_signals() -> tuple[int, ...]:
    """SIGTERM and SIGINT; in a submitit job also submitit's timeout/preemption signal."""
    signals = [signal.SIGTERM, signal.SIGINT]
    if in_launcher_job():
        launcher_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if launcher_signal is not None and launcher_signal not in signals:
            signals.append(launcher_signal)
    return tuple(signals)


def hand_over_to_launcher(signum: int) -> None:
    """After a run stopped by `signum` wrote its checkpoint (and segtrain's handlers are given back): in a
    submitit job, run the handler submitit installed for `signum`. For its timeout/preemption signal,
    rank 0 requeues the job and exits; the other ranks return. Nothing outside a submitit job."""
    if not in_launcher_job():
        return
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


class PreemptionHandler:
    """Context manager: records the first SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self, what: str = "training") -> None:
        self.signum: int | None = None
        self.what = what
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            if self.what == "training":
                log.warning("%s received: finishing the current step (or validation batch), then writing a "
                            "checkpoint (SIGINT again to exit at once)", signal.Signals(signum).name)
            else:
                log.warning("%s received: stopping the %s at the next batch (SIGINT again to exit at once)",
                            signal.Signals(signum).name, self.what)

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in preemption_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class FlagExchange:
    """Whether any process raised its flag, one iteration late and without a device synchronisation."""

    def __init__(self) -> None:
        # The default group may be NCCL (GPU tensors only): the host flag gets a gloo group of its own.
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.pending: tuple[dist.Work, torch.Tensor] | None = None

    def exchange(self, flag: bool) -> bool:
        """Start summing this iteration's `flag`; returns whether any process raised it at the previous call."""
        raised = False
        if self.pending is not None:
            work, total = self.pending
            work.wait()
            raised = bool(total.numpy()[0] > 0)  # a host buffer filled by gloo: reading it waits for nothing
        total = torch.tensor([1.0 if flag else 0.0])
        self.pending = (dist.all_reduce(total, group=self.group, async_op=True), total)
        return raised

    def exchange_now(self, flag: bool) -> bool:
        """Whether any process raised its flag at the previous call or now, waiting for the answer (after a
        validation, when the processes have just synchronised anyway). Every process must make the same
        sequence of exchange / exchange_now calls."""
        raised = self.exchange(flag)
        work, total = self.pending
        self.pending = None
        work.wait()
        return raised or bool(total.numpy()[0] > 0)

    def close(self) -> None:
        """Let the last exchange finish (every process started it) before the process group goes."""
        if self.pending is not None:
            work, _ = self.pending
            self.pending = None
            try:
                work.wait(timedelta(seconds=30))
            except RuntimeError:  # another process failed before it: nothing to wait for
                pass
