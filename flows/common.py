"""What every flow shares: its settings (``params.yaml`` with the run's overrides), the
task runner (``runner: thread | dask``) of the fan-out stages, and how a bad input reads in
the console and in the flow run's state: one line (:func:`one_line_user_errors`,
:func:`failed_state`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ddps_core.config import Settings, load_settings
from ddps_core.errors import ConfigError, user_message


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dotted override keys)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def settings_for(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Settings:
    """Validated settings: ``params_path`` with ``overrides`` applied on top. ``overrides`` are
    a flow run's (a deployment's) parameters: dotted keys as ``ddps --set`` takes them
    (``{"ddpm.steps": 500}``) or the same as nested sections (``{"ddpm": {"steps": 500}}``).
    A missing ``params_path`` is an error; ``params_path=None`` means the embedded defaults."""
    return load_settings(None if params_path is None else Path(params_path), flatten(overrides or {}))


def task_runner(settings: Settings, max_workers: int | None = None) -> Any:
    """The task runner ``settings.runner`` names: a thread pool in this process (``thread``,
    ``max_workers`` threads), or a ``DaskTaskRunner`` (``dask``) on the scheduler at
    ``dask.address``, or on a ``distributed.LocalCluster`` of ``dask.n_workers`` worker
    processes started for the flow run (and closed after it)."""
    if settings.runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("runner: dask needs prefect-dask; install the dask extra "
                          "(pip install 'ddps[dask]')") from None
    d = settings.dask
    if d.address:
        return DaskTaskRunner(address=d.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": d.n_workers, "threads_per_worker": d.threads_per_worker,
                                          "processes": True, "dashboard_address": None,
                                          "host": "127.0.0.1"})


def parallel_tasks(settings: Settings) -> int:
    """Tasks a fan-out step's work is dealt into (per split for labelling): one on the thread
    runner (the work is torch-parallel already), ``dask.tasks_per_split`` (or
    ``dask.n_workers``) on Dask."""
    if settings.runner != "dask":
        return 1
    return settings.dask.tasks_per_split or settings.dask.n_workers


class _NoTracebackForUserErrors(logging.Formatter):
    """A console formatter that leaves out the traceback of a bad input (an exception with a
    :func:`~ddps_core.errors.user_message`: its one line says it all) and formats every other
    record as ``inner`` does. The record itself is left as it was, so the API log handler
    still sends the traceback to the Prefect server (the run's log in the UI)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or user_message(exc) is None:
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def one_line_user_errors() -> None:
    """Keep tracebacks of bad input out of Prefect's console log (idempotent): every console
    handler Prefect set up gets :class:`_NoTracebackForUserErrors` around its formatter."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter,
                                                                             _NoTracebackForUserErrors):
                handler.setFormatter(_NoTracebackForUserErrors(handler.formatter))


def failed_state(exc: BaseException) -> Any:
    """The flow run's end state for bad input ``exc``: Failed, with the one line a user reads
    (:func:`~ddps_core.errors.user_message`) as its message, and ``exc`` as its result, so
    that ``state.result()`` and a direct call of the flow raise it as before. None when
    ``exc`` is not bad input (a bug keeps Prefect's own handling, and its traceback) or when
    no flow run is going on (the flow's function called directly)."""
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    told = user_message(exc)
    if told is None or FlowRunContext.get() is None:
        return None
    return Failed(message=told[0], data=exc)
