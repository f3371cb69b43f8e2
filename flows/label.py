"""Flow of the ``label`` stage: test split with every method, the pool with ``ddpm``."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.ensemble import label_split_task


@flow(name="label", log_prints=True)
def label_flow(ensemble: dict[str, Any] | None = None, params_path: str = "params.yaml") -> list[str]:
    settings = settings_for(params_path, {"ensemble": ensemble})
    jobs = [(m, "test") for m in settings.ensemble.methods]
    if "ddpm" in settings.ensemble.methods and "unlabeled" in settings.features.splits:
        jobs.append(("ddpm", "unlabeled"))
    futures = [label_split_task.submit(settings, m, s) for m, s in jobs]
    for f in futures:
        f.result()
    done = [f"{m}/{s}" for m, s in jobs]
    print(f"labelled: {done}")
    return done


if __name__ == "__main__":
    label_flow()
