"""One writer per run directory: `<run dir>/.segtrain.lock` holds the writing process's PID, host and command.

A second `segtrain train` on a live run directory would write over the first one's checkpoints (and
its `best.pt` with a worse model); it fails at once naming the holder instead. eval takes the lock of
its run directory and predict the one of its output folder alike, so no two commands write one folder. A lock left by a
process that is gone (killed, crashed machine) is taken over with a warning. Under torchrun only
rank 0 holds it. In a submitit (SLURM) job the lock names the job too: a requeued job, perhaps on
another node, takes over the lock of its own earlier start.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from segtrain.engine.distributed import launcher_job_id
from segtrain.errors import ConfigError

log = logging.getLogger("segtrain.train")

LOCK_NAME = ".segtrain.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(run_dir: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treat as held by an unknown process that is gone
    return holder if isinstance(holder, dict) else {}


def live_holder(run_dir: Path) -> dict[str, Any] | None:
    """The lock's holder if it is a running process (or on another host, where we cannot tell)."""
    holder = read_lock(run_dir)
    if not holder:
        return None
    job = launcher_job_id()
    if job is not None and holder.get("job") == job:
        return None  # this scheduler job's earlier start: the job was requeued, so that process is gone
    if holder.get("host") != socket.gethostname():
        return holder
    pid = holder.get("pid")
    return holder if isinstance(pid, int) and pid != os.getpid() and _alive(pid) else None


def refuse_if_held(run_dir: Path, setting: str = "hydra.run.dir") -> None:
    """`setting`: the key that named the folder, for the message (predict's is `output`)."""
    holder = live_holder(run_dir)
    if holder is None:
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    # Another host's process cannot be checked from here: the user says it is gone by deleting the lock.
    where = "" if holder.get("host") == socket.gethostname() else (
        f" on another host (if that job no longer runs on {holder.get('host')}, delete {Path(run_dir) / LOCK_NAME} "
        "to take the directory over)")
    command = holder.get("command", "train")
    raise ConfigError(
        f"{'run directory' if setting == 'hydra.run.dir' else setting + ' folder'} {run_dir} is in use by segtrain "
        f"{command} (pid {holder.get('pid')}, host {holder.get('host')}, since {since}){where}; wait for it to "
        f"finish, or choose another {setting}"
    )


# Outputs of an evaluation or a training run: an evaluation never shares a directory with them.
RUN_OUTPUTS = ("metrics.json", "per_class_iou.csv", "confusion_matrix.png", "predictions", "checkpoints",
               "metrics.jsonl")


def refuse_used_eval_dir(run_dir: Path) -> None:
    """One evaluation per directory: outputs of two runs are never mixed (predictions of the old one
    would stay beside the new metrics; `.hydra/` of a training run would be rewritten)."""
    held = [name for name in RUN_OUTPUTS if (Path(run_dir) / name).exists()]
    if held:
        raise ConfigError(f"hydra.run.dir={run_dir} already holds another run's outputs ({', '.join(held)}); "
                          "choose a new directory (the default is a new one per run)")


def refuse_used_run_dir(command: str, run_dir: Path) -> None:
    """Before Hydra writes its files into an explicit hydra.run.dir: every command refuses one a live
    command holds; eval also one that holds another run's outputs."""
    refuse_if_held(run_dir)
    if command == "eval":
        refuse_used_eval_dir(run_dir)


class RunLock:
    """Acquire with `acquire()`, give back with `release()` (also safe when never acquired)."""

    def __init__(self, run_dir: Path, command: str = "train", setting: str = "hydra.run.dir") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.command, self.setting = command, setting
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "job": launcher_job_id(), "command": self.command})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            refuse_if_held(self.path.parent, self.setting)
            log.warning("taking over %s from a process that is gone (%s)", self.path, read_lock(self.path.parent))
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(record)
            os.replace(tmp, self.path)
            if read_lock(self.path.parent).get("pid") != os.getpid():  # another process took it over first
                refuse_if_held(self.path.parent, self.setting)
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
        self.held = True

    def release(self) -> None:
        if self.held and (read_lock(self.path.parent) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
