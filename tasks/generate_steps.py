"""Prefect tasks of the ``generate`` stage's fan-out: the generated source's steps
(sampling batches, feature shards, labelling parts), each task owning its work items.

The plan tasks run once per step, before the step's work tasks; the stage's
:func:`tasks.generate.generate_task` then finds every step done and filters and exports.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from ddps_core.generate import stage
from tasks.common import every, retry_unless_user_error


def _progress(what: str) -> Any:
    logger = get_run_logger()

    def progress(step: str, done: int, total: int) -> None:
        if done == total or done % every(total) == 0:
            logger.info("%s %s: %d/%d", step, what, done, total)

    return progress


@task(name="plan-samples", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def plan_samples_task(settings: Settings, n_tasks: int) -> list[list[int]]:
    """Reset the work folder if the model or sampler changed; unfinished batches per task."""
    return stage.plan_samples(settings, n_tasks, log=get_run_logger().info)


@task(name="sample-batches", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def sample_batches_task(settings: Settings, batches: list[int]) -> int:
    return stage.sample_batches(settings, batches, _progress(f"batches {batches}"))


@task(name="plan-sample-features", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def plan_sample_features_task(settings: Settings, n_tasks: int) -> list[list[int]]:
    """Create or reopen the samples' feature store; its undone shards per task."""
    return stage.plan_sample_features(settings, n_tasks, log=get_run_logger().info)


@task(name="extract-sample-shards", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def extract_sample_shards_task(settings: Settings, shards: list[int]) -> int:
    return stage.extract_sample_shards(settings, shards, _progress(f"shards {shards}"))


@task(name="plan-sample-labels", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def plan_sample_labels_task(settings: Settings, n_tasks: int) -> list[list[int]]:
    """Start labelling the samples; their unfinished parts per task."""
    return stage.plan_sample_labels(settings, n_tasks)


@task(name="label-sample-parts", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def label_sample_parts_task(settings: Settings, parts: list[int]) -> int:
    return stage.label_sample_parts(settings, parts, _progress(f"parts {parts}"))


@task(name="finish-sample-labels", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def finish_sample_labels_task(settings: Settings) -> int:
    scores = stage.finish_sample_labels(settings)
    return 0 if scores is None else len(scores)
