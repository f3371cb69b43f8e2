"""Prefect task of the ``train_student`` stage."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from tasks.common import retry_unless_user_error


@task(name="train-student", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def train_student_task(settings: Settings) -> dict[str, Any]:
    """Train and select the student (a retry resumes after the last finished epoch)."""
    from ddps_core.student.stage import run_stage

    logger = get_run_logger()

    def on_epoch(row: dict[str, Any]) -> None:
        val = "-" if row["val_miou"] is None else f"{100 * row['val_miou']:.2f}"
        logger.info("epoch %d/%d: loss %.4f, real-image mIoU %s, %.1f s", row["epoch"],
                    settings.student.epochs, row["loss"], val, row["seconds"])

    return run_stage(settings, on_epoch=on_epoch, log=logger.info)
