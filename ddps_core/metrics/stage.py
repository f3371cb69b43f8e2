"""Stage ``evaluate``: every method's test-split predictions scored in one report.

The methods are the teacher and its baselines (their labels from stage ``label``) and, with
``evaluate.student``, the student (its predictions from stage ``train_student``). Each is
scored against the test split's labels as the feature stores hold them, with the ignore
index of ``data`` and the boundary band of ``evaluate``. Outputs, under ``evaluate.reports``
(a folder or an fsspec URL)::

    evaluate.parquet                 the ``ddps score`` schema with a ``method`` column (fractions)
    metrics/evaluate.json            {method: {miou, mbiou, aacc, macc}} in percent

Its pictures and plot tables are stage ``report``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ddps_core import storage
from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.errors import DataError
from ddps_core.metrics.files import load_label_map
from ddps_core.metrics.report import REPORT_COLUMNS, report_frame, write_report
from ddps_core.metrics.segmentation import ConfusionAccumulator
from ddps_core.progress import Reporter
from ddps_core.stages import Stage

__all__ = ["EVALUATE", "percent", "prediction_folders", "report_locations"]


def prediction_folders(settings: Settings) -> dict[str, Path]:
    """Method -> folder of its test-split label PNGs: the teacher and its baselines, then the
    student (``evaluate.student``), whose stage writes ``<student.out>/test/``."""
    from ddps_core.teacher.stage import label_folder, methods

    folders = {m: label_folder(settings, m, "test") for m in methods(settings)}
    if settings.evaluate.student:
        folders["student"] = Path(settings.student.out) / "test"
    return folders


def report_locations(settings: Settings, stage: str = "evaluate") -> dict[str, Path | str]:
    """Where stage ``evaluate`` (or ``refine``) writes its report and metrics, under
    ``evaluate.reports`` (a folder or a URL)."""
    base = settings.evaluate.reports
    return {"report": storage.join(base, f"{stage}.parquet"),
            "metrics": storage.join(base, "metrics", f"{stage}.json")}


def evaluate(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``evaluate``: the report and its metrics (see the module text); each file is
    written atomically. Returns ``{method: {miou, mbiou, aacc, macc}}`` in
    percent."""
    from ddps_core.features.stage import open_store

    where = report_locations(settings)
    options = settings.storage.options
    truth = open_store(settings, "test", read_only=True)
    names = DDPMSegFolder(settings.data.out, "test").class_names
    frames, summary = [], {}
    folders = prediction_folders(settings)
    for n_method, (method, folder) in enumerate(folders.items()):
        report.progress("evaluate", n_method, len(folders))
        acc = ConfusionAccumulator(truth.num_classes, ignore_index=settings.data.ignore_index,
                                   boundary_ratio=settings.evaluate.boundary_ratio)
        for i, image_id in enumerate(truth.image_ids):
            path = folder / f"{image_id}.png"
            if not path.is_file():
                stage = "train_student" if method == "student" else "label"
                raise DataError(f"{path}: missing prediction; run the {stage} stage")
            acc.update(load_label_map(path), truth.label(i), image_id, source=str(path))
        result = acc.result()
        frame = report_frame(result, names)
        frame.insert(0, "method", method)
        frames.append(frame)
        summary[method] = {k: percent(result.summary[k]) for k in ("miou", "mbiou", "aacc", "macc")}
        report.log(f"{method:12s} mIoU {summary[method]['miou']:.2f}  mBIoU {summary[method]['mbiou']:.2f}")
    report.progress("evaluate", len(folders), len(folders))
    df = pd.concat(frames, ignore_index=True)[["method", *REPORT_COLUMNS]]
    write_report(df, where["report"], options)
    storage.write_text(where["metrics"], json.dumps(summary, indent=2), options)
    return summary


def percent(fraction: float) -> float:
    """A metric as the reports show it: percent, rounded to 1e-4 (NaN stays NaN)."""
    return round(100.0 * float(fraction), 4)


EVALUATE = Stage("evaluate", main=evaluate, device="cpu",
                 products=lambda s: [str(v) for v in report_locations(s).values()])
