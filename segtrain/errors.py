"""Errors that segtrain reports to the user as one clear line instead of a traceback."""

import re

ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class SegtrainError(Exception):
    """Base class: the CLI prints `segtrain <command>: error: <message>` and exits with status 2."""


class ConfigError(SegtrainError):
    """A config key has a value that cannot work; the message names the key."""


class DataError(SegtrainError):
    """A dataset file is missing, unreadable or holds invalid labels; the message names the file."""


class WeightsError(SegtrainError):
    """Pretrained weights or a checkpoint cannot be loaded; the message names the file."""


class CheckpointWriteError(SegtrainError):
    """A checkpoint could not be written (disk full, quota); the previous one is intact."""


class TrainingStopped(SegtrainError):
    """A guard stopped training (non-finite loss, too many skipped steps, out of memory)."""


class Preempted(SegtrainError):
    """SIGTERM / SIGINT: the current step finished and a checkpoint was written; exit 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def user_message(exc: BaseException) -> str:
    """The message to show: for an error re-raised from a DataLoader worker, the original one line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if last.startswith(("segtrain.", "DataError", "ConfigError")) else last
    return text


def first_line(exc_or_text: BaseException | str) -> str:
    """One line for a message that quotes another library's error, whose text may be a paragraph
    with terminal colour codes: the first non-blank line; for an exception, `Type: line`."""
    text = ANSI_COLOUR.sub("", str(exc_or_text))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else "no details"
    return f"{type(exc_or_text).__name__}: {line}" if isinstance(exc_or_text, BaseException) else line
