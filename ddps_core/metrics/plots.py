"""Plot tables for DVC: small CSVs cut from the Parquet reports.

``dvc plots`` reads CSV / JSON / TSV / YAML, not Parquet, so the ``evaluate`` and ``refine``
stages also write one CSV per method into a folder (DVC draws every file of a plot folder
as its own series):

``reports/plots/per_class_iou/<method>.csv``
    ``class_id, class_name, iou, biou`` (percent): the dataset-level IoU and Boundary IoU of
    every class, from ``reports/evaluate.parquet``.
``reports/plots/refine_steps/<method>.csv``
    ``step, miou, mbiou`` (percent): the test-split scores after each collected DDPS
    refinement step, from ``reports/refine.parquet``; the student, which has no step, is one
    row at step ``-1`` (its first prediction, before any refinement).
"""

from __future__ import annotations

import pandas as pd

__all__ = ["PER_CLASS", "REFINE_STEPS", "per_class_table", "refine_step_table", "by_method", "to_csv"]

#: File names, under the reports folder (``evaluate.reports``).
PER_CLASS = "plots/per_class_iou"
REFINE_STEPS = "plots/refine_steps"


def _require(report: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in report.columns]
    if missing:
        raise ValueError(f"{what}: the report lacks columns {missing}")


def per_class_table(report: pd.DataFrame) -> pd.DataFrame:
    """Class rows of a ``method``-keyed report as ``method, class_id, class_name, iou, biou``
    (percent)."""
    _require(report, ["method", "scope", "class_id", "class_name", "iou", "biou"], "per-class plot")
    rows = report[report["scope"] == "class"]
    out = pd.DataFrame({
        "method": rows["method"].astype(str).to_numpy(),
        "class_id": rows["class_id"].astype("int64").to_numpy(),
        "class_name": rows["class_name"].astype(str).to_numpy(),
        "iou": 100 * rows["iou"].astype("float64").to_numpy(),
        "biou": 100 * rows["biou"].astype("float64").to_numpy(),
    })
    return out


def refine_step_table(report: pd.DataFrame) -> pd.DataFrame:
    """Summary rows of a ``refine`` report as ``method, step, miou, mbiou`` (percent), the
    student at step -1, sorted by method then step."""
    _require(report, ["method", "step", "scope", "miou", "mbiou"], "DDPS step plot")
    rows = report[report["scope"] == "summary"]
    out = pd.DataFrame({
        "method": rows["method"].astype(str).to_numpy(),
        "step": rows["step"].fillna(-1).astype("int64").to_numpy(),
        "miou": 100 * rows["miou"].astype("float64").to_numpy(),
        "mbiou": 100 * rows["mbiou"].astype("float64").to_numpy(),
    })
    return out.sort_values(["method", "step"], kind="stable").reset_index(drop=True)


def by_method(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{method: its rows without the method column}``, in order of appearance."""
    return {str(m): table[table["method"] == m].drop(columns="method").reset_index(drop=True)
            for m in pd.unique(table["method"])}


def to_csv(table: pd.DataFrame) -> str:
    """``table`` as CSV text, floats with 4 decimals (write it with :mod:`ddps_core.storage`)."""
    return table.to_csv(index=False, float_format="%.4f")
