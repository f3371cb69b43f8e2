"""Prefect task that cuts the DVC plot tables (CSV) out of a stage's Parquet report."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Literal

import pandas as pd
from prefect import task

from ddps_core import storage
from ddps_core.metrics import plots


@task(name="write-plot-tables", retries=1, tags=["cpu"])
def plot_table_task(kind: Literal["per_class", "ddps_steps"], report: str, out: str,
                    options: Mapping[str, Any] | None = None) -> list[str]:
    """Write the ``per_class`` tables (from the evaluate report) or the ``ddps_steps`` tables
    (from the refine report), one ``<method>.csv`` per method under ``out`` (a folder or an
    fsspec URL); returns the files written."""
    frame = pd.read_parquet(io.BytesIO(storage.read_bytes(report, options)))
    table = plots.per_class_table(frame) if kind == "per_class" else plots.ddps_step_table(frame)
    written = []
    for method, rows in plots.by_method(table).items():
        path = str(storage.join(out, f"{method}.csv"))
        storage.write_text(path, plots.to_csv(rows), options)
        written.append(path)
    return written
