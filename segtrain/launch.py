"""`python -m segtrain.launch [torchrun options] -m segtrain train ...`: torchrun, with the exit a scheduler reads.

Plain torchrun forwards SIGTERM to its workers (each checkpoints and exits 143) but then ends itself with a
traceback and status 1, and a worker that died becomes a page-long report. Under this launcher the same
run ends with one line: 128 + the signal number after a SIGTERM or SIGINT (143 or 130: SLURM's
`--requeue --signal=TERM@120` and `resume=auto` continue it), or the failed worker's rank and exit status.
Every option is torchrun's own (`python -m segtrain.launch --help`).
"""

from __future__ import annotations

import signal
import sys


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as exc:
        signum = int(exc.sigval)
        print(f"segtrain.launch: stopped by {_signal_name(signum)}; the workers checkpointed before exiting (their "
              "last line says where). Resume with the same command plus resume=auto", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = f"exit status {failure.exitcode}" if failure.exitcode >= 0 else f"killed by {failure.signal_name()}"
        print(f"segtrain.launch: worker rank {rank} (pid {failure.pid}) failed first ({how}); its output above says "
              "why", file=sys.stderr)
        raise SystemExit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode) from None


if __name__ == "__main__":
    main()
