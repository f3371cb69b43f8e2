"""Flow of the ``refine`` stage: DDPS refinement of the test split, scored per step."""

from __future__ import annotations

from typing import Any

from prefect import flow

from ddps_core.metrics import plots
from ddps_core.refiner.stage import REPORT, format_step_table
from flows.common import settings_for
from tasks.ddps import refine_task
from tasks.reports import plot_table_task


@flow(name="refine", log_prints=True)
def refine_flow(ddps: dict[str, Any] | None = None, params_path: str = "params.yaml") -> list[dict[str, Any]]:
    """Stage ``refine``. ``ddps`` holds partial overrides of its section. Prints the step
    table (student alone, then each DDPS model at every collected step)."""
    settings = settings_for(params_path, {"refiner": ddps})
    table = refine_task(settings)
    plot_table_task("ddps_steps", REPORT, f"reports/{plots.DDPS_STEPS}")
    print("\n" + format_step_table(table))
    return table


if __name__ == "__main__":
    refine_flow()
