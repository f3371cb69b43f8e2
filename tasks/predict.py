"""The Prefect task of ``ddps predict``: the whole run as one task, tagged ``predict`` and
``gpu`` (the ``gpu`` concurrency limit and pool route it), with the stages' retry policy: a
retried run reuses the masks already written (docs/predict.md#resume)."""

from __future__ import annotations

from typing import Any

from prefect import task

from ddps_core.config import Settings
from ddps_core.predict import predict_images
from tasks.common import retry_unless_user_error
from tasks.stage import PrefectReporter

__all__ = ["predict_task"]


@task(name="predict", task_run_name="predict-{model}", tags=["predict", "gpu"], retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error)
def predict_task(settings: Settings, inputs: list[str], model: str, out: str, overlay: bool, uncertainty: bool,
                 batch_size: int) -> dict[str, Any]:
    """:func:`ddps_core.predict.predict_images`, reporting to the run's log and progress bar."""
    return predict_images(settings, inputs, model, out, overlay=overlay, uncertainty=uncertainty,
                          batch_size=batch_size, report=PrefectReporter())
