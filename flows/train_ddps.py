"""Flow of the ``train_ddps`` stage: the DDPS mask prior on the frozen student."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.ddps import train_ddps_task


@flow(name="train_ddps", log_prints=True)
def train_ddps_flow(ddps: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``train_ddps``. ``ddps`` holds partial overrides of its section."""
    settings = settings_for(params_path, {"refiner": ddps})
    summary = train_ddps_task(settings)
    for method, m in summary["models"].items():
        print(f"{method} (x0 = {m['x0_source']}): {m['steps']} steps, final loss {m['final_loss']} -> {m['out']}")
    return summary


if __name__ == "__main__":
    train_ddps_flow()
