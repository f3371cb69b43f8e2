"""Prefect tasks of the ``data`` stage: thin wrappers around ``ddps_core.datasets``."""

from __future__ import annotations

from typing import Any

from prefect import task

from ddps_core.config import DataSettings
from ddps_core.datasets.prepare import prepare_dataset
from tasks.common import retry_unless_user_error


@task(name="prepare-dataset", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def prepare_dataset_task(data: DataSettings) -> dict[str, Any]:
    """Make (synthetic) or import and validate (user data) the canonical dataset."""
    return prepare_dataset(data)
