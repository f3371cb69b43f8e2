"""Flow of the ``evaluate`` stage: reports/ddpm_seg.parquet, DVC metrics, figures."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.ensemble import evaluate_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    summary = evaluate_task(settings_for(params_path))
    for method, m in summary.items():
        print(f"{method:12s} mIoU {100 * m['miou']:.2f}  mBIoU {100 * m['mbiou']:.2f}")
    return summary


if __name__ == "__main__":
    evaluate_flow()
