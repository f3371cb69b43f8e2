"""Stage ``evaluate``: every method's test-split predictions scored in one report.

The methods are the teacher and its baselines (their labels from stage ``label``) and, with
``evaluate.student``, the student (its predictions from stage ``train_student``). Each is
scored against the test split's labels as the feature stores hold them, with the metric
conventions of ``evaluate`` (ignore index, boundary band width). Outputs, under
``evaluate.reports`` (a folder or an fsspec URL)::

    evaluate.parquet                 the ``ddps score`` schema with a ``method`` column (fractions)
    metrics/evaluate.json            {method: {miou, mbiou, aacc, macc}} in percent
    plots/per_class_iou/<method>.csv per-class IoU and Boundary IoU, for ``dvc plots``
    figures/overlays/<method>_<id>.png  image | truth | prediction [| uncertainty]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddps_core import storage
from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, load_image, to_square
from ddps_core.datasets.common import png_bytes
from ddps_core.errors import DataError
from ddps_core.metrics import plots
from ddps_core.metrics.files import load_label_map
from ddps_core.metrics.report import REPORT_COLUMNS, report_frame, write_report
from ddps_core.metrics.segmentation import ConfusionAccumulator
from ddps_core.progress import Reporter
from ddps_core.stages import Stage

__all__ = ["EVALUATE", "overlay_figures", "percent", "prediction_folders", "report_locations", "write_plot_tables"]


def prediction_folders(settings: Settings) -> dict[str, Path]:
    """Method -> folder of its test-split label PNGs: the teacher and its baselines, then the
    student (``evaluate.student``), whose stage writes ``<student.out>/test/``."""
    from ddps_core.teacher.stage import label_folder, methods

    folders = {m: label_folder(settings, m, "test") for m in methods(settings)}
    if settings.evaluate.student:
        folders["student"] = Path(settings.student.out) / "test"
    return folders


def report_locations(settings: Settings) -> dict[str, Path | str]:
    """Where stage ``evaluate`` writes, under ``evaluate.reports`` (a folder or a URL)."""
    base = settings.evaluate.reports
    return {"report": storage.join(base, "evaluate.parquet"),
            "metrics": storage.join(base, "metrics", "evaluate.json"),
            "plots": storage.join(base, plots.PER_CLASS),
            "figures": storage.join(base, "figures", "overlays")}


def write_plot_tables(table: pd.DataFrame, out: str | Path, options: dict[str, Any] | None = None) -> list[str]:
    """One ``<method>.csv`` per method of a plot ``table`` under ``out`` (a folder or a URL)."""
    written = []
    for method, rows in plots.by_method(table).items():
        path = str(storage.join(out, f"{method}.csv"))
        storage.write_text(path, plots.to_csv(rows), options)
        written.append(path)
    return written


def overlay_figures(settings: Settings, method: str, split: str, folder: str | Path,
                    out_dir: str | Path, limit: int = 8) -> list[Path | str]:
    """``image | truth | prediction [| uncertainty]`` PNGs of the first ``limit`` images of
    ``split`` predicted in ``folder`` (the uncertainty panel, when ``<id>_uncertainty.png``
    exists, stretched to the image's own maximum). ``out_dir`` may be a URL."""
    from ddps_core.viz import grid, overlay

    reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
    folder = Path(folder)
    ign = settings.data.ignore_index
    written = []
    for k in range(min(limit, len(reader))):
        sample = reader[k]
        pred = np.asarray(load_image(folder / f"{sample.id}.png"))[..., 0]
        image, gt = to_square(sample.image, sample.label, pred.shape[0])
        row = [image, overlay(image, gt, ignore_index=ign), overlay(image, pred, ignore_index=ign)]
        heat_path = folder / f"{sample.id}_uncertainty.png"
        if heat_path.is_file():
            heat = np.asarray(load_image(heat_path)).astype(np.float32)
            row.append((heat * (255.0 / max(float(heat.max()), 1.0))).astype(np.uint8))  # stretched
        path = storage.join(out_dir, f"{method}_{sample.id}.png")
        storage.write_bytes(path, png_bytes(grid([row], scale=max(1, 128 // pred.shape[0]))),
                            settings.storage.options)
        written.append(path)
    return written


def evaluate(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``evaluate``: the report, metrics, plot tables and overlays (see the module
    text); each file is written atomically. Returns ``{method: {miou, mbiou, aacc, macc}}`` in
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
        overlay_figures(settings, method, "test", folder, where["figures"], settings.evaluate.figures)
        report.log(f"{method:12s} mIoU {summary[method]['miou']:.2f}  mBIoU {summary[method]['mbiou']:.2f}")
    report.progress("evaluate", len(folders), len(folders))
    df = pd.concat(frames, ignore_index=True)[["method", *REPORT_COLUMNS]]
    write_report(df, where["report"], options)
    storage.write_text(where["metrics"], json.dumps(summary, indent=2), options)
    write_plot_tables(plots.per_class_table(df), where["plots"], options)
    return summary


def percent(fraction: float) -> float:
    """A metric as the reports show it: percent, rounded to 1e-4 (NaN stays NaN)."""
    return round(100.0 * float(fraction), 4)


EVALUATE = Stage("evaluate", main=evaluate, device="cpu",
                 products=lambda s: [str(v) for v in report_locations(s).values()])
