"""Flow of the ``data`` stage: make or import the canonical dataset (``data.out``)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.data import prepare_dataset_task


@flow(name="data", log_prints=True)
def data_flow(data: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``data``. ``data`` holds partial overrides of the ``data`` section of
    ``params_path`` (e.g. ``{"synthetic": {"seed": 3}}``)."""
    settings = settings_for(params_path, {"data": data}).data
    summary = prepare_dataset_task(settings)
    print(f"dataset ready in {settings.out}: {summary['counts']}")
    return summary


if __name__ == "__main__":
    data_flow()
