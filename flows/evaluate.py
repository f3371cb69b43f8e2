"""Flow of the ``evaluate`` stage: reports/ddpm_seg.parquet, DVC metrics and plot table, figures."""

from __future__ import annotations

from typing import Any

from prefect import flow

from ddps_core import storage
from ddps_core.metrics import plots
from ddps_core.teacher.stage import report_locations
from flows.common import settings_for
from tasks.ensemble import evaluate_task
from tasks.reports import plot_table_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    settings = settings_for(params_path)
    summary = evaluate_task(settings)
    plot_table_task("per_class", str(report_locations(settings)["report"]),
                    str(storage.join(settings.evaluate.reports, plots.PER_CLASS)), settings.storage.options)
    for method, m in summary.items():
        print(f"{method:12s} mIoU {100 * m['miou']:.2f}  mBIoU {100 * m['mbiou']:.2f}")
    return summary


if __name__ == "__main__":
    evaluate_flow()
