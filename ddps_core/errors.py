"""Exceptions that the CLI turns into one clear message and a non-zero exit.

Every error raised for bad user input derives from :class:`DDPSError`. Its message must name
the offending file (or configuration key) and say what is wrong with it, so that a user can
fix the input without reading a traceback.
"""

from __future__ import annotations

import errno


class DDPSError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 1


class ConfigError(DDPSError):
    """``params.yaml`` or a CLI override is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class DataError(DDPSError):
    """An input file or folder is unreadable, inconsistent or malformed."""


class DataWarning(UserWarning):
    """An input that is used after a documented repair (a label map of another size than its
    image, resized to it); the message names the file. The ``data`` stage passes each to its
    report, and ``ddps data check`` prints each as a ``warning:`` line."""


class CheckpointError(DDPSError):
    """A checkpoint cannot be loaded: wrong keys or shapes, unsafe content, unreadable."""


# File-system faults in plain words (the path comes first in the message).
_OS_FAULTS = {
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded (the disk is full for this user)",
    errno.EROFS: "read-only file system: cannot write here",
    errno.EACCES: "permission denied",
}


def user_message(exc: BaseException) -> tuple[str, int] | None:
    """The one line and the exit status a user gets for ``exc``: bad input
    (:class:`DDPSError`) and file-system faults (a full disk, a read-only folder) are theirs
    to fix; anything else is a bug (None), which deserves its traceback."""
    if isinstance(exc, DDPSError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{_OS_FAULTS.get(exc.errno) or exc.strerror or exc}", 1
    return None
