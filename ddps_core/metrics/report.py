"""Metrics report: one long-format table (pandas DataFrame / Parquet file).

Schema (every row has every column; null / NaN where a column does not apply):

=====================  =========  ==========================================================
column                 dtype      meaning
=====================  =========  ==========================================================
``scope``              str        ``"class"``, ``"image"`` or ``"summary"``
``class_id``           Int64      class id (class rows only)
``class_name``         str        class name, default ``"class_<i>"`` (class rows only)
``image_id``           str        image id / file stem (image rows only)
``iou``                float64    dataset-level IoU of the class (NaN if absent from both)
``biou``               float64    dataset-level Boundary IoU of the class
``acc``                float64    per-class accuracy ``I / label area`` (NaN if no label)
``area_intersect``     Int64      pixels (summed over the dataset), class rows only
``area_union``         Int64      "
``area_pred``          Int64      "
``area_label``         Int64      "
``boundary_intersect`` Int64      boundary-band pixels, class rows only
``boundary_union``     Int64      "
``miou``               float64    image rows: that image's mIoU; summary row: dataset mIoU
``mbiou``              float64    summary row only
``aacc``               float64    summary row only
``macc``               float64    summary row only
=====================  =========  ==========================================================

String columns hold Python ``str`` / missing values; pandas picks the string dtype (``object``
on pandas 2, ``str`` on pandas 3). Parquet stores them as UTF-8 strings and the ``Int64``
columns as nullable int64, so ``pandas.read_parquet`` restores the same dtypes.

Row order: class rows by ``class_id``, then image rows in evaluation order, then one summary
row.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ddps_core.io import atomic_path
from ddps_core.metrics.segmentation import SegmentationResult

__all__ = ["REPORT_COLUMNS", "report_frame", "write_report"]

_AREA_COLUMNS = [
    "area_intersect",
    "area_union",
    "area_pred",
    "area_label",
    "boundary_intersect",
    "boundary_union",
]

REPORT_COLUMNS: list[str] = [
    "scope",
    "class_id",
    "class_name",
    "image_id",
    "iou",
    "biou",
    "acc",
    *_AREA_COLUMNS,
    "miou",
    "mbiou",
    "aacc",
    "macc",
]



def report_frame(result: SegmentationResult, class_names: list[str] | None = None) -> pd.DataFrame:
    """Build the long-format report (see the module docstring for the schema)."""
    k = result.num_classes
    if class_names is None:
        class_names = [f"class_{i}" for i in range(k)]
    elif len(class_names) != k:
        raise ValueError(f"got {len(class_names)} class names for {k} classes")
    n_img = len(result.per_image)
    n = k + n_img + 1
    cls = slice(0, k)
    img = slice(k, k + n_img)

    def floats() -> np.ndarray:
        return np.full(n, np.nan, dtype=np.float64)

    def objects() -> np.ndarray:
        return np.full(n, None, dtype=object)

    def ints(values: np.ndarray | None = None) -> pd.arrays.IntegerArray:
        data = np.zeros(n, dtype=np.int64)
        mask = np.ones(n, dtype=bool)
        if values is not None:
            data[cls] = values
            mask[cls] = False
        return pd.arrays.IntegerArray(data, mask)

    scope = objects()
    scope[cls] = "class"
    scope[img] = "image"
    scope[-1] = "summary"
    class_name = objects()
    class_name[cls] = [str(name) for name in class_names]
    image_id = objects()
    image_id[img] = [str(i) for i, _ in result.per_image]

    columns: dict[str, object] = {
        "scope": scope,
        "class_id": ints(np.arange(k, dtype=np.int64)),
        "class_name": class_name,
        "image_id": image_id,
    }
    for name, values in (("iou", result.iou), ("biou", result.biou), ("acc", result.acc)):
        col = floats()
        col[cls] = values
        columns[name] = col
    for name in _AREA_COLUMNS:
        columns[name] = ints(np.asarray(getattr(result, name), dtype=np.int64))
    miou = floats()
    miou[img] = [m for _, m in result.per_image]
    miou[-1] = result.summary["miou"]
    columns["miou"] = miou
    for name in ("mbiou", "aacc", "macc"):
        col = floats()
        col[-1] = result.summary[name]
        columns[name] = col
    df = pd.DataFrame(columns, columns=REPORT_COLUMNS)
    return df


def write_report(df: pd.DataFrame, path: str | os.PathLike[str],
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` as a Parquet file at ``path`` atomically (no partial file on failure).

    ``path`` may be an fsspec URL (``s3://bucket/reports/x.parquet``): the file is then
    encoded in memory and written in one put (:mod:`ddps_core.storage`)."""
    from ddps_core import storage

    missing = [c for c in REPORT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"report frame lacks columns {missing}")
    if storage.is_remote(path):
        buf = io.BytesIO()
        df.to_parquet(buf, engine="pyarrow", index=False)
        storage.write_bytes(path, buf.getvalue(), storage_options)
        return
    with atomic_path(storage.local_path(path)) as tmp:
        df.to_parquet(tmp, engine="pyarrow", index=False)
