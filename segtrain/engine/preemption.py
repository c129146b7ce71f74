"""SIGTERM / SIGINT during training: finish the step, checkpoint, exit with 128 + the signal number.

Schedulers read 143 (SIGTERM) and 130 (SIGINT) as "terminated by a signal"; a SLURM job submitted
with `--requeue` and `--signal=TERM@120` is requeued and `resume=auto` continues it. A second
SIGINT (Ctrl-C twice) exits at once.

Under torch.distributed every process must stop at the same iteration. `FlagExchange` sums the
processes' flags without blocking a step: the all-reduce started at the end of iteration i runs in
the background and is read at the end of iteration i + 1, when it has long finished; every process
reads the same sum at the same iteration, so all stop after i + 1 (one step later than a blocking
exchange would). The flag lives in host memory, exchanged over a gloo group, so reading it never
waits for the device (an NCCL all-reduce of a GPU flag would make the host wait for the step's kernels).
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger("segtrain.train")


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
            for sig in (signal.SIGTERM, signal.SIGINT):
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

    def close(self) -> None:
        """Let the last exchange finish (every process started it) before the process group goes."""
        if self.pending is not None:
            work, _ = self.pending
            self.pending = None
            try:
                work.wait(timedelta(seconds=30))
            except RuntimeError:  # another process failed before it: nothing to wait for
                pass
