"""Library chatter (INFO lines, warnings, prints) kept off the console and written to the run's log file.

The ONNX exporter logs a dozen optimisation passes at INFO and `torch.jit` warns that it is
deprecated and that a trace fixes shapes; none of it is the user's business at the console, but a
run's log file (Hydra's `<command>.log`) keeps it for whoever needs the details.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "onnx", "torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                  "torch.fx", "torch.jit")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _to_log_files(records: list[logging.LogRecord]) -> None:
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for record in records:
        for handler in files:
            if record.levelno >= handler.level:
                handler.handle(record)


def _record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 0, message, None, None)


@contextlib.contextmanager
def library_output_to_log(name: str) -> Iterator[None]:
    """Inside: the libraries' log records, Python warnings and stdout/stderr prints are collected;
    after (error or not): they are written to the log files under the logger name `name`."""
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in CHATTY_LOGGERS]
    saved = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)  # at the level the logging config gives (INFO under Hydra)
        logger.propagate = False
    printed = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed), \
                contextlib.redirect_stderr(printed):
            warnings.simplefilter("always")
            yield
    finally:
        for logger, propagate in zip(loggers, saved):
            logger.removeHandler(collect)
            logger.propagate = propagate
        records = list(collect.records)
        records += [_record(name, logging.WARNING, f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})")
                    for w in caught]
        records += [_record(name, logging.INFO, line) for line in printed.getvalue().splitlines() if line.strip()]
        _to_log_files(records)
