"""Prefect tasks of the ``train_ddpm`` stage."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from ddps_core.diffusion.train import StepInfo, run_stage
from tasks.common import retry_unless_user_error


@task(name="train-ddpm", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def train_ddpm_task(settings: Settings) -> dict[str, Any]:
    """Train the DDPM (a retry resumes from the last checkpoint) or adopt ``ddpm.checkpoint``."""
    logger = get_run_logger()

    def on_step(info: StepInfo) -> None:
        if info.step % (settings.ddpm.log_every * 10) == 0 or info.step == info.total:
            logger.info("step %d/%d loss %.4f (mse %.4f vb %.4f) lr %.2e %.1f img/s", info.step,
                        info.total, info.loss, info.mse, info.vb, info.lr, info.images_per_s)

    return run_stage(settings, on_step=on_step, log=logger.info)
