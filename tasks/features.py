"""Prefect tasks of the ``extract`` stage. Each extraction task owns whole shards."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from ddps_core.features.stage import extract_shards, prepare_store
from tasks.common import retry_unless_user_error


@task(name="prepare-feature-store", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def prepare_store_task(settings: Settings, split: str, variant: str = "ddpm") -> list[list[int]]:
    """Create or validate ``split``'s store; the undone shards, one group per writer."""
    return prepare_store(settings, split, log=get_run_logger().info, variant=variant)


@task(name="extract-shards", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def extract_shards_task(settings: Settings, split: str, shards: list[int],
                        variant: str = "ddpm") -> dict[str, Any]:
    """Fill ``shards`` of the store (a retry resumes: finished shards are skipped)."""
    logger = get_run_logger()
    counts = extract_shards(settings, split, shards, variant=variant,
                            progress=lambda done: logger.info("%s: %d images done", split, done))
    logger.info("%s shards %s: %s", split, shards, counts)
    return counts
