"""How a stage says how far it is, without knowing who listens.

Library code reports through a :class:`Reporter`: ``progress(task, done, total, **values)``
for counted work (training steps, images, shards) and ``log(message)`` for lines a user
should read. The base class ignores both, so a library call needs no reporter at all. The
CLI draws progress bars, a Prefect flow logs and publishes progress artifacts, a test
collects the calls: each is a subclass of this one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["CallbackReporter", "LineReporter", "Reporter"]


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


class LineReporter(Reporter):
    """Progress as text lines, for logs and pipes: a task's first report, then one line about
    every tenth of its work or every ``every_s`` seconds, and its last."""

    def __init__(self, write: Callable[[str], None], every_s: float = 30.0):
        self.write, self.every_s = write, every_s
        self._last: dict[str, tuple[float, float]] = {}  # task -> (time, fraction) last written

    def progress(self, task: str, done: int, total: int | None = None, **values: float) -> None:
        fraction = done / total if total else 0.0
        now = time.monotonic()
        last_t, last_f = self._last.get(task, (-float("inf"), -1.0))
        finished = total is not None and done >= total
        if not (finished or fraction - last_f >= 0.1 or now - last_t >= self.every_s):
            return
        self._last[task] = (now, fraction)
        shown = "".join(f", {k.replace('_', ' ')} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        self.write(f"{task}: {done}/{total if total is not None else '?'}{shown}")

    def log(self, message: str) -> None:
        self.write(message)
