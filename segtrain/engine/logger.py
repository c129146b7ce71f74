"""What a training run records, and how its log lines share the console with the progress bar.

`RunLogger` is the one place scalars are written: each goes to TensorBoard and to `metrics.jsonl`
(one JSON object per logged iteration: `iteration`, `time` and every tag logged at it), so the two
never disagree. It also writes the run's hyper-parameters for TensorBoard's HParams tab into the
run's own event file (not a sub-run, as `SummaryWriter.add_hparams` would) and the composed config
as text. Only rank 0 writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def keep_until(path: Path, iteration: int) -> None:
    """Drop the lines of `path` past `iteration` (a resumed run writes them again), and a half-written
    last line of a killed run. Rewritten atomically; untouched when nothing is dropped."""
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record["iteration"]) <= iteration
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        dropped = dropped or not keep
    if dropped:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)


def tensorboard_logdir(run_dir: Path) -> Path:
    """The directory to point TensorBoard at: the run's parent, so the run shows under its own name (its
    time, or a sweep job's number) beside its neighbours; given the run itself, TensorBoard names it `.`."""
    run_dir = Path(run_dir)
    if run_dir.name in ("", ".", ".."):  # `.` or `..`: no name of its own until made absolute
        run_dir = run_dir.resolve()
    return run_dir.parent


class RunLogger:
    """`open(start_iteration)` before the first write; `scalars()` during the step; `end_step()` after it."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.run_dir, self.enabled, self.tensorboard = Path(run_dir), enabled, tensorboard
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter once open, when tensorboard is on
        self.file: Any = None
        self.pending: dict[str, Any] | None = None

    def open(self, start_iteration: int) -> None:
        """A resumed run continues both records from `start_iteration`: TensorBoard hides the events
        after it (purge_step) and metrics.jsonl loses its lines after it."""
        if not self.enabled or self.file is not None:
            return
        path = self.run_dir / METRICS_FILE
        keep_until(path, start_iteration)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run, closed in close()
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir), purge_step=start_iteration + 1)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        """Every value to TensorBoard now and into this iteration's metrics.jsonl line."""
        if not self.enabled:
            return
        if self.pending is not None and self.pending["iteration"] != iteration:
            self.end_step()
        if self.pending is None:
            self.pending = {"iteration": iteration, "time": round(time.time(), 3)}
        for tag, value in values.items():
            value = float(value)
            self.pending[tag] = _json_number(value)
            if self.writer is not None:
                self.writer.add_scalar(tag, value, iteration)

    def end_step(self) -> None:
        """Write the iteration's line (if anything was logged at it); flushed, so `tail -f` follows it."""
        if self.pending is None or self.file is None:
            self.pending = None
            return
        self.file.write(json.dumps(self.pending) + "\n")
        self.file.flush()
        self.pending = None

    def start_session(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                      iteration: int) -> None:
        """The HParams entry (hyper-parameters and the tags of its metrics) and the config as text."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        experiment, session_start, self.session_end = hparams_summaries(hparams, dict.fromkeys(metric_tags, 0.0))
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary, iteration)
        self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), iteration)

    def end_session(self, iteration: int) -> None:
        """Marks the HParams session as finished (a run stopped early shows as unfinished)."""
        if self.writer is not None and getattr(self, "session_end", None) is not None:
            self.writer.file_writer.add_summary(self.session_end, iteration)
            self.session_end = None

    def close(self) -> None:
        self.end_step()
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Throughput:
    """Iterations per second over the iterations since the last reading, with the time spent in
    `excluded()` (validation, checkpoints) left out, so a short last window reads right too. The
    excluded time is also kept per kind over the whole run: `remaining_seconds` adds it to the ETA."""

    def __init__(self, iteration: int) -> None:
        self.reset(iteration)
        self.spent: dict[str, float] = {}  # kind -> seconds, over the run
        self.occurrences: dict[str, int] = {}

    def reset(self, iteration: int, now: float | None = None) -> None:
        self.iteration, self.paused = iteration, 0.0
        self.tic = time.perf_counter() if now is None else now

    @contextlib.contextmanager
    def excluded(self, kind: str = "other") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.paused += seconds
            self.spent[kind] = self.spent.get(kind, 0.0) + seconds
            self.occurrences[kind] = self.occurrences.get(kind, 0) + 1

    def mean_seconds(self, kind: str) -> float | None:
        """The mean duration of one `excluded(kind)` so far; None before the first."""
        count = self.occurrences.get(kind, 0)
        return self.spent[kind] / count if count else None

    def rate(self, iteration: int) -> float:
        now = time.perf_counter()
        elapsed = now - self.tic - self.paused
        done = iteration - self.iteration
        self.reset(iteration, now)
        return done / max(elapsed, 1e-9)


def due_count(iteration: int, max_iters: int, interval: int) -> int:
    """How many of the iterations after `iteration` up to `max_iters` run an event due every
    `interval` iterations and at the last one (the loop's rule for validation and checkpoints)."""
    if iteration >= max_iters:
        return 0
    multiples = max_iters // interval - iteration // interval
    return multiples + (0 if max_iters % interval == 0 else 1)


def remaining_seconds(iteration: int, max_iters: int, rate: float, intervals: dict[str, int],
                      throughput: Throughput) -> tuple[float, dict[str, int]]:
    """The time left: the remaining steps at `rate` plus every validation and checkpoint still due,
    each at its mean duration so far. Returns the seconds and, per kind not measured yet (before
    the first validation), how many are due, which the ETA names instead of guessing their length."""
    seconds = (max_iters - iteration) / rate if rate > 0 else math.inf
    unmeasured = {}
    for kind, interval in intervals.items():
        count = due_count(iteration, max_iters, interval)
        mean = throughput.mean_seconds(kind)
        if mean is not None:
            seconds += count * mean
        elif count:
            unmeasured[kind] = count
    return seconds, unmeasured


def format_remaining(seconds: float, unmeasured: dict[str, int]) -> str:
    """`0:04:31`, or `0:00:48 + 3 validations` while their duration is not known yet."""
    text = format_eta(seconds)
    plural = {"validation": "validations", "checkpoint": "checkpoints"}
    for kind, count in unmeasured.items():
        text += f" + {count} {kind if count == 1 else plural.get(kind, kind + 's')}"
    return text


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- the console while a progress bar is shown -------------------------------------------------

PROGRESS_RECORD = "progress_line"  # `extra={PROGRESS_RECORD: True}`: a line the bar already shows


class _AboveTheBar(logging.Handler):
    """A console handler that writes through tqdm, so a line never lands inside the bar."""

    def __init__(self, replaced: logging.StreamHandler) -> None:
        super().__init__(replaced.level)
        self.setFormatter(replaced.formatter)
        for existing in replaced.filters:
            self.addFilter(existing)
        self.stream = replaced.stream

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, PROGRESS_RECORD, False):
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return (type(handler) is logging.StreamHandler
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


@contextlib.contextmanager
def console_above_bar(bar_shown: bool) -> Iterator[None]:
    """While the bar is shown, console log lines go above it and the per-interval loss/LR lines (the
    bar shows them) only to the log file; without a bar nothing changes."""
    root = logging.getLogger()
    swapped = [(h, _AboveTheBar(h)) for h in root.handlers if _is_console(h)] if bar_shown else []
    for console, above in swapped:
        root.removeHandler(console)
        root.addHandler(above)
    try:
        yield
    finally:
        for console, above in swapped:
            root.removeHandler(above)
            root.addHandler(console)
