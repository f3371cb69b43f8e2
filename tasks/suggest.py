"""The Prefect task of ``ddps suggest``: one task, tagged ``suggest`` and ``gpu`` (the pool
labelling and the descriptors run the DDPM), with the stages' retry policy: a retried run
reuses the pool labels already written."""

from __future__ import annotations

from typing import Any

from prefect import task

from ddps_core.active import suggest
from ddps_core.config import Settings
from tasks.common import retry_unless_user_error
from tasks.stage import PrefectReporter

__all__ = ["suggest_task"]


@task(name="suggest", tags=["suggest", "gpu"], retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error)
def suggest_task(settings: Settings, n: int, out: str, candidates: int | None, near_copy: float) -> dict[str, Any]:
    """:func:`ddps_core.active.suggest`, reporting to the run's log and progress bar."""
    return suggest(settings, n, out, PrefectReporter(), candidates=candidates, near_copy=near_copy)
