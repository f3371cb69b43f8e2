"""Flow of the ``label`` stage: test split with every method, the pool with ``ddpm``.

Per (method, split), one task starts the labelling and deals the unfinished 64-image parts
into disjoint groups (one per task: ``tasks_per_split``), the part tasks run concurrently
on the task runner that ``runner`` names, and one task joins the parts' scores.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from ddps_core.config import Settings
from ddps_core.teacher.stage import label_jobs
from flows.common import settings_for, tasks_per_split, with_runner
from tasks.ensemble import finish_label_task, label_parts_task, plan_label_task


@flow(name="label_parts", log_prints=True)
def label_parts_flow(settings: Settings) -> list[str]:
    jobs = label_jobs(settings)
    n = tasks_per_split(settings)
    plans = {job: plan_label_task(settings, *job, n) for job in jobs}
    futures = {job: [label_parts_task.submit(settings, *job, parts) for parts in plans[job]] for job in jobs}
    finished = [finish_label_task.submit(settings, *job, wait_for=futures[job]) for job in jobs]
    for f in finished:
        f.result()
    done = [f"{m}/{s}" for m, s in jobs]
    print(f"labelled: {done}")
    return done


@flow(name="label", log_prints=True)
def label_flow(ensemble: dict[str, Any] | None = None, params_path: str = "params.yaml") -> list[str]:
    settings = settings_for(params_path, {"teacher": ensemble})
    return with_runner(label_parts_flow, settings)(settings)


if __name__ == "__main__":
    label_flow()
