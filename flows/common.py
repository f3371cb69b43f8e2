"""What every stage flow shares: reading its section of ``params.yaml``, and the task runner
(``runner: thread | dask``) of the fan-out stages."""

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


def settings_for(params_path: str | Path = "params.yaml",
                 overrides: dict[str, dict[str, Any] | None] | None = None) -> Settings:
    """Validated settings: ``params.yaml`` (or the embedded defaults when it is missing),
    with each section's partial ``overrides`` (a deployment's parameters) applied on top."""
    path = Path(params_path)
    dotted: dict[str, Any] = {}
    for section, values in (overrides or {}).items():
        dotted.update(flatten(values or {}, f"{section}."))
    return load_settings(path if path.exists() else None, dotted)


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


def with_runner(flow_: Any, settings: Settings, max_workers: int | None = None) -> Any:
    """``flow_`` with the task runner of ``settings`` (a flow's runner is fixed when it is
    decorated, so the stage flow reads its settings and then runs this sub-flow)."""
    return flow_.with_options(task_runner=task_runner(settings, max_workers))


def tasks_per_split(settings: Settings) -> int:
    """Labelling / generation tasks per split: one on the thread runner (the work of a split
    is torch-parallel already), ``dask.tasks_per_split`` (or ``dask.n_workers``) on Dask."""
    if settings.runner != "dask":
        return 1
    return settings.dask.tasks_per_split or settings.dask.n_workers
