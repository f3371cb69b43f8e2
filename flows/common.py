"""What every flow shares: its settings (``params.yaml`` with the run's overrides), and the
task runner (``runner: thread | dask``) of the fan-out stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddps_core.config import Settings, load_settings
from ddps_core.errors import ConfigError


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
