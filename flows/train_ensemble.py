"""Flow of the ``train_ensemble`` stage: the pixel-MLP teacher per feature method."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.ensemble import train_ensemble_task


@flow(name="train_ensemble", log_prints=True)
def train_ensemble_flow(ensemble: dict[str, Any] | None = None,
                        params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``train_ensemble``. ``ensemble`` holds partial overrides of its section."""
    settings = settings_for(params_path, {"teacher": ensemble})
    futures = {m: train_ensemble_task.submit(settings, m) for m in settings.teacher.methods}
    return {m: f.result() for m, f in futures.items()}


if __name__ == "__main__":
    train_ensemble_flow()
