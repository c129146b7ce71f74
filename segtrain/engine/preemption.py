"""SIGTERM / SIGINT during training: finish the step, checkpoint, exit with 128 + the signal number.

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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

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

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing the current step, then writing a checkpoint (SIGINT again to "
                        "exit at once)", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in preemption_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
