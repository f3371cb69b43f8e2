"""Runs one stage of a tiny project and prints a progress marker line (``@@ <marker>``) at
each progress report, flushed, so that a test can SIGKILL it at a chosen point. The trainers
report through a :class:`~ddps_core.progress.Reporter` in an order fixed by the settings, so a
marker (``<task> <done>``) names the same point in every run.

``python -m tests.faults.driver <stage> <settings.json>``: the settings file is a
``Settings.model_dump(mode="json")``. ``run`` is also called in-process for the reference
run, with ``emit`` collecting the same markers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from ddps_core.progress import Reporter

STAGES = ("extract", "ensemble", "generate", "ddps")


class Markers(Reporter):
    """A marker ``<task> <done>`` for every progress report."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit

    def progress(self, task: str, done: int, total: int | None = None, **values: float) -> None:
        self.emit(f"{task} {done}")


def run(stage: str, settings: Any, emit: Callable[[str], None]) -> dict[str, Any]:
    """The stage function the CLI command calls (``ddps features extract``, ``ddps ensemble
    train``, ``ddps generate``, ``ddps ddps train``), with a progress callback emitting markers."""
    if stage == "extract":
        from ddps_core.features.stage import run_stage

        return run_stage(settings, progress=lambda name, done, _n: emit(f"{name} {done}"))
    if stage == "ensemble":
        from ddps_core.teacher.stage import run_train

        return run_train(settings, report=Markers(emit))
    if stage == "generate":
        from ddps_core.generate.stage import run_stage

        return run_stage(settings, progress=lambda step, done, _n: emit(f"{step} {done}"))
    if stage == "ddps":
        from ddps_core.refiner.stage import run_train

        return run_train(settings, report=Markers(emit))
    raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from ddps_core.config import parse_settings

    stage, path = argv
    with open(path) as fh:
        settings = parse_settings(json.load(fh), source=path)
    emit = lambda m: print(f"@@ {m}", flush=True)  # noqa: E731
    emit("ready")
    run(stage, settings, emit)
    emit("finished")


if __name__ == "__main__":
    main(sys.argv[1:])
