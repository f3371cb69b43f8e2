"""Shared task policy: retry transient failures, never retry bad user input."""

from __future__ import annotations

from typing import Any

from ddps_core.errors import DDPSError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: a :class:`DDPSError` (bad input) is final.

    Retrying a corrupt file or an invalid setting only repeats the same message; anything
    else (an OOM, a lost connection, a killed worker) goes on to the task's retry policy.
    """
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result could not be read: let the retry policy decide
        return True
    return not isinstance(exc, DDPSError)
