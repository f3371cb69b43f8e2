"""Exceptions that the CLI turns into one clear message and a non-zero exit.

Every error raised for bad user input derives from :class:`DDPSError`. Its message must name
the offending file (or configuration key) and say what is wrong with it, so that a user can
fix the input without reading a traceback.
"""

from __future__ import annotations


class DDPSError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 1


class ConfigError(DDPSError):
    """``params.yaml`` or a CLI override is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class DataError(DDPSError):
    """An input file or folder is unreadable, inconsistent or malformed."""


class CheckpointError(DDPSError):
    """A checkpoint cannot be loaded: wrong keys or shapes, unsafe content, unreadable."""
