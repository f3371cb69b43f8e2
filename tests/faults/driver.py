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

STAGES = ("extract", "train_teacher", "generate", "train_refiner")


def run(stage: str, settings: Any, emit: Callable[[str], None]) -> dict[str, Any]:
    """Stage ``stage`` through its one implementation (what ``ddps`` and its flow run), with a
    reporter that emits a marker ``<task> <done>`` at every progress report."""
    from ddps_core import stages
    from ddps_core.progress import CallbackReporter

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    return stages.get(stage).run(settings, CallbackReporter(progress=lambda task, done, *_a, **_k: emit(f"{task} {done}")))


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
