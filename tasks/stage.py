"""The Prefect tasks of a stage (:class:`ddps_core.stages.Stage`).

A simple stage runs as one task (:data:`run_stage`). A fan-out stage runs each step's plan as
one task (:data:`plan_step`), then one task per group of the plan (:data:`run_part`), then its
``main`` (:data:`finish_stage`). Every task:

* retries transient faults (a lost worker, an OOM) and never bad input (a
  :class:`~ddps_core.errors.DDPSError` is final): a retried part resumes where it stopped,
  because every stage writes its outputs atomically and resumably;
* is tagged with the stage name and its device (``gpu`` or ``cpu``), so that the ``gpu`` tag
  concurrency limit and work pools route it (:func:`tagged`);
* reports its progress to the flow's logger and to a Prefect progress artifact
  (:class:`PrefectReporter`).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from ddps_core import stages
from ddps_core.config import Settings
from ddps_core.progress import LineReporter
from tasks.common import retry_unless_user_error

__all__ = ["PrefectReporter", "finish_stage", "plan_step", "run_part", "run_stage", "tagged"]


class PrefectReporter(LineReporter):
    """Progress as lines in the flow run's log (:class:`~ddps_core.progress.LineReporter`) and
    as one Prefect progress artifact per task name, which the UI shows as a bar."""

    def __init__(self) -> None:
        logger = get_run_logger()
        super().__init__(lambda line: logger.info("%s", line))
        self._debug = logger.debug
        self._artifacts: dict[str, Any] = {}

    def progress(self, task: str, done: int, total: int | None = None, **values: float) -> None:
        before = self._last.get(task)
        super().progress(task, done, total, **values)
        if total and self._last.get(task) is not before:  # a line was written: update the bar too
            self._artifact(task, 100.0 * min(done / total, 1.0))

    def _artifact(self, task: str, percent: float) -> None:
        try:
            if task not in self._artifacts:
                self._artifacts[task] = create_progress_artifact(percent, description=task)
            else:
                update_progress_artifact(self._artifacts[task], percent)
        except Exception as exc:  # progress is a courtesy: never fail the work for it
            self._debug(f"progress artifact of {task} not updated: {exc}")


_POLICY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": retry_unless_user_error}


@task(name="stage", task_run_name="{name}", **_POLICY)
def run_stage(name: str, settings: Settings) -> dict[str, Any]:
    """A simple stage, whole."""
    return stages.get(name).run(settings, PrefectReporter())


def _step(name: str, step: str) -> Any:
    return next(s for s in stages.get(name).steps if s.name == step)


@task(name="plan", task_run_name="{name}-plan-{step}", **_POLICY)
def plan_step(name: str, step: str, settings: Settings, n: int) -> list[Any]:
    """Step ``step`` of fan-out stage ``name``: prepare its outputs; its groups of work."""
    return _step(name, step).plan(settings, n, PrefectReporter())


@task(name="part", task_run_name="{name}-{step}", **_POLICY)
def run_part(name: str, step: str, settings: Settings, group: Any) -> Any:
    """One group of work of step ``step`` of stage ``name`` (this task owns its outputs)."""
    return _step(name, step).part(settings, group, PrefectReporter())


@task(name="finish", task_run_name="{name}-finish", **_POLICY)
def finish_stage(name: str, settings: Settings) -> dict[str, Any]:
    """The ``main`` of fan-out stage ``name``, after all its steps."""
    return stages.get(name).main(settings, PrefectReporter())


def tagged(t: Any, name: str) -> Any:
    """Task ``t`` tagged with stage ``name`` and the stage's device (``gpu`` / ``cpu``)."""
    return t.with_options(tags=[name, stages.get(name).device])
