"""How a stage says how far it is, without knowing who listens.

Library code reports through a :class:`Reporter`: ``progress(task, done, total, **values)``
for counted work (training steps, images, shards) and ``log(message)`` for lines a user
should read. The base class ignores both, so a library call needs no reporter at all. The
CLI draws progress bars, a Prefect flow logs and publishes progress artifacts, a test
collects the calls: each is a subclass of this one.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CallbackReporter", "Reporter"]


class Reporter:
    """Receives a stage's progress; this base class ignores it."""

    def progress(self, task: str, done: int, total: int | None = None, **values: float) -> None:
        """``task`` (a short name: ``"ddpm"``, ``"extract train"``) has done ``done`` of ``total``
        units (``None``: unknown). ``values`` are current figures worth showing beside it
        (``loss``, ``lr``, ``mIoU``); a reporter may show or drop them."""

    def log(self, message: str) -> None:
        """One line for the user (what was resumed, what was skipped, what was written)."""


class CallbackReporter(Reporter):
    """A reporter made of two plain functions (either may be None)."""

    def __init__(self, progress: Callable[..., None] | None = None,
                 log: Callable[[str], None] | None = None):
        self._progress, self._log = progress, log

    def progress(self, task: str, done: int, total: int | None = None, **values: float) -> None:
        if self._progress is not None:
            self._progress(task, done, total, **values)

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
