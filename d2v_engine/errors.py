"""User-facing errors: printed as one line by the entry points, never as a traceback wall."""
from __future__ import annotations

import errno
import os


class D2VError(Exception):
    """Base class of every error caused by the user's input (config, data, checkpoints)."""


class ConfigError(D2VError):
    """A config file, key or value is wrong; the message names the key and what is allowed."""


class DataError(D2VError):
    """A data path, manifest or file is missing, empty or unreadable; the message names the file."""


class CheckpointError(D2VError):
    """No usable checkpoint where one is required, or a checkpoint that does not fit the run."""


class TrainingError(D2VError):
    """The run cannot go on: updates non-finite too many times in a row, or collapsed targets."""


def debug() -> bool:
    """D2V_DEBUG=1: the entry points re-raise user errors, so their traceback shows."""
    return os.environ.get("D2V_DEBUG") == "1"


def one_line(error: BaseException) -> str:
    """The error's own message; a DataLoader worker wraps it in its traceback, which is dropped."""
    text = str(error).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def error_line(error: BaseException) -> str | None:
    """The one line a user sees for an error of their input or their machine (a D2VError, or an
    OSError: permissions, a full disk, a missing file); None for anything else (a bug: its
    traceback is the report)."""
    if isinstance(error, D2VError):
        return one_line(error)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        what = error.strerror or one_line(error)
        if error.errno == errno.ENOSPC:
            what = f"{what} (free some, or lower train.keep_last)"
        elif error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            what = f"{what} (choose a writable run.dir or output folder)"
        return f"{where}{what}"
    return None
