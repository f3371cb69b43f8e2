"""Prefect tasks of the ``train_ddps`` and ``refine`` stages (the DDPS mask prior).

Both carry the tag ``gpu`` so that a tag concurrency limit or a work pool can route them to
a GPU worker; they retry transient faults only (bad input, :class:`DDPSError`, is final).
A retried ``train_ddps`` resumes from its last checkpoint; ``refine`` is simply redone.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from tasks.common import every, retry_unless_user_error


@task(name="train-ddps", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def train_ddps_task(settings: Settings) -> dict[str, Any]:
    """Train (or resume) the DDPS denoiser and, with ``refiner.ablation``, its ``x0 = gt`` twin."""
    from ddps_core.refiner.stage import run_train

    logger = get_run_logger()
    stride = every(settings.refiner.steps)

    def on_step(method: str, info: Any) -> None:
        if info.step % stride == 0 or info.step == info.total:
            logger.info("%s step %d/%d (%s): loss %.4f, lr %.2e, %.1f img/s", method, info.step, info.total,
                        info.stage, info.loss, info.lr, info.images_per_s)

    return run_train(settings, on_step=on_step, log=logger.info)


@task(name="refine", retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def refine_task(settings: Settings) -> list[dict[str, Any]]:
    """Refine and score the test split; returns the step table (one record per method)."""
    from ddps_core.refiner.stage import run_refine, step_table

    logger = get_run_logger()

    def progress(done: int, total: int) -> None:
        if done == total or done % every(total) == 0:
            logger.info("refine: %d/%d images", done, total)

    df = run_refine(settings, progress=progress, log=logger.info)
    return step_table(df).to_dict("records")
