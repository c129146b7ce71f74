"""SIGTERM / SIGINT during training: finish the step (or the validation batch), checkpoint, exit with
128 + the signal number; during an evaluation: stop at the next batch, exit the same way.

Schedulers read 143 (SIGTERM) and 130 (SIGINT) as "terminated by a signal"; a SLURM job submitted
with `--requeue` and `--signal=TERM@120` is requeued and `resume=auto` continues it. A second
SIGINT (Ctrl-C twice) exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("segtrain.train")


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
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
