"""Flow of the ``generate`` stage: the label-efficient generated dataset (METHODS.md §5).

With a ``generated`` source, each step of it (sampling batches, the samples' feature
shards, labelling parts) is planned by one task and fanned out over ``tasks_per_split``
tasks with disjoint work items, on the task runner that ``runner`` names; the last task
filters every source and exports the dataset.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from ddps_core.config import Settings
from flows.common import settings_for, tasks_per_split, with_runner
from tasks.generate import generate_task
from tasks.generate_steps import (extract_sample_shards_task, finish_sample_labels_task,
                                  label_sample_parts_task, plan_sample_features_task,
                                  plan_sample_labels_task, plan_samples_task, sample_batches_task)


@flow(name="generate_steps", log_prints=True)
def generate_steps_flow(settings: Settings) -> dict[str, Any]:
    n = tasks_per_split(settings)
    steps = [(plan_samples_task, sample_batches_task),
             (plan_sample_features_task, extract_sample_shards_task),
             (plan_sample_labels_task, label_sample_parts_task)]
    for plan, work in steps:  # each step needs the previous one's outputs
        for f in [work.submit(settings, items) for items in plan(settings, n)]:
            f.result()
    finish_sample_labels_task(settings)
    stats = generate_task(settings)
    for source, s in stats.items():
        if isinstance(s, dict):
            print(f"{source}: {s['kept']}/{s['candidates']} kept, dropped {s['dropped']}")
    print(f"exported {stats['total_kept']} labelled images to {settings.generate.out}")
    return stats


@flow(name="generate", log_prints=True)
def generate_flow(generate: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``generate``. ``generate`` holds partial overrides of its section."""
    settings = settings_for(params_path, {"generate": generate})
    return with_runner(generate_steps_flow, settings)(settings)


if __name__ == "__main__":
    generate_flow()
