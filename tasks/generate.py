"""Prefect tasks of the ``generate`` stage."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from tasks.common import every, retry_unless_user_error


@task(name="generate-dataset", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def generate_task(settings: Settings) -> dict[str, Any]:
    """Sample / extract / label / filter / export (a retry resumes every step)."""
    from ddps_core.generate.stage import run_stage

    logger = get_run_logger()

    def progress(step: str, done: int, total: int) -> None:
        if done == total or done % every(total) == 0:
            logger.info("%s: %d/%d", step, done, total)

    return run_stage(settings, progress=progress, log=logger.info)
