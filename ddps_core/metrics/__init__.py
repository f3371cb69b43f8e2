"""Segmentation metrics: mIoU, aAcc, mAcc and Boundary IoU (mBIoU), DDPS / mmseg conventions.

* :mod:`ddps_core.metrics.segmentation` -- :class:`ConfusionAccumulator`,
  :class:`SegmentationResult`, :func:`evaluate_arrays` (definitions of every metric).
* :mod:`ddps_core.metrics.boundary` -- boundary bands with one dilation per label map.
* :mod:`ddps_core.metrics.files` -- :func:`evaluate_dirs` over PNG / ``.npy`` folders,
  :func:`load_class_names`.
* :mod:`ddps_core.metrics.report` -- :data:`REPORT_COLUMNS`, :func:`report_frame`,
  :func:`write_report` (long-format Parquet report; schema in that module's docstring).
"""

from ddps_core.metrics.boundary import boundary_band, boundary_width, label_edges
from ddps_core.metrics.files import evaluate_dirs, load_class_names, load_label_map
from ddps_core.metrics.report import REPORT_COLUMNS, report_frame, write_report
from ddps_core.metrics.segmentation import (
    ConfusionAccumulator,
    SegmentationResult,
    evaluate_arrays,
)

__all__ = [
    "REPORT_COLUMNS",
    "ConfusionAccumulator",
    "SegmentationResult",
    "boundary_band",
    "boundary_width",
    "evaluate_arrays",
    "evaluate_dirs",
    "label_edges",
    "load_class_names",
    "load_label_map",
    "report_frame",
    "write_report",
]
