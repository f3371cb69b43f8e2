"""Stage ``evaluate``: every method's test-split predictions scored in one report.

The methods are the teacher and its baselines (their labels from stage ``label``) and, with
``evaluate.student``, the student (its predictions from stage ``train_student``). Each is
scored against the test split's own labels at their own size (every method predicts at each
image's size, see :mod:`ddps_core.inference`), with the ignore index of ``data`` and the
boundary band of ``evaluate``. The report records the protocol (:func:`scoring_protocol`). Outputs, under ``evaluate.reports``
(a folder or an fsspec URL)::

    evaluate.parquet                 the ``ddps score`` schema with ``method``, ``resize``, ``model_size``
                                     and ``tta`` columns (fractions)
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

__all__ = ["EVALUATE", "percent", "prediction_folders", "report_locations", "scoring_protocol"]


def prediction_folders(settings: Settings) -> dict[str, Path]:
    """Method -> folder of its test-split label PNGs: the teacher and its baselines, then the
    student (``evaluate.student``), whose stage writes ``<student.out>/test/``."""
    from ddps_core.teacher.stage import label_folder, methods

    folders = {m: label_folder(settings, m, "test") for m in methods(settings)}
    if settings.evaluate.student:
        folders["student"] = Path(settings.student.out) / "test"
    return folders


def scoring_protocol(settings: Settings, method: str = "teacher") -> dict[str, Any]:
    """How ``method``'s scores were made, recorded beside them: predictions at the labels' own
    size from ``S x S`` model inputs made by ``data.resize`` (``model_size`` is ``S``: the
    diffusion model's for the teacher and its baselines, the student's own), with the
    test-time augmentation of ``evaluate.flip`` / ``evaluate.scales`` (``tta``: ``none``,
    ``flip``, ``ms`` or ``ms+flip``; scales count in ``slide`` mode only)."""
    from ddps_core.diffusion.presets import get_preset

    e = settings.evaluate
    ms = bool(e.scales) and settings.data.resize == "slide"
    tta = "+".join((["ms"] if ms else []) + (["flip"] if e.flip else [])) or "none"
    size = int(get_preset(settings.ddpm.preset).image_size)
    if method == "student":  # its own input size, in the record train_student writes
        info = Path(settings.student.out) / "model.json"
        size = int(json.loads(info.read_text()).get("image_size") or size) if info.is_file() else size
    return {"resize": settings.data.resize, "model_size": size, "tta": tta}


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
    where = report_locations(settings)
    options = settings.storage.options
    truth = DDPMSegFolder(settings.data.out, "test", ignore_index=settings.data.ignore_index)
    names = truth.class_names
    folders = prediction_folders(settings)
    accs = {m: ConfusionAccumulator(truth.num_classes, ignore_index=settings.data.ignore_index,
                                    boundary_ratio=settings.evaluate.boundary_ratio) for m in folders}
    report.progress("evaluate", 0, len(truth))
    for k in range(len(truth)):
        sample = truth[k]  # the dataset's own label, at its size, read once for every method
        for method, folder in folders.items():
            path = folder / f"{sample.id}.png"
            stage = "train_student" if method == "student" else "label"
            if not path.is_file():
                raise DataError(f"{path}: missing prediction; run the {stage} stage")
            pred = load_label_map(path)
            if pred.shape != sample.label.shape:
                raise DataError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]}, the label "
                                f"{sample.label.shape[1]}x{sample.label.shape[0]}; rerun the {stage} stage")
            accs[method].update(pred, sample.label, sample.id, source=str(path))
        report.progress("evaluate", k + 1, len(truth))
    frames, summary = [], {}
    for method, acc in accs.items():
        result = acc.result()
        frame = report_frame(result, names)
        frame.insert(0, "method", method)
        for k, (key, value) in enumerate(scoring_protocol(settings, method).items(), start=1):
            frame.insert(k, key, value)
        frames.append(frame)
        summary[method] = {k: percent(result.summary[k]) for k in ("miou", "mbiou", "aacc", "macc")}
        report.log(f"{method:12s} mIoU {summary[method]['miou']:.2f}  mBIoU {summary[method]['mbiou']:.2f}")
    df = pd.concat(frames, ignore_index=True)[["method", "resize", "model_size", "tta", *REPORT_COLUMNS]]
    write_report(df, where["report"], options)
    storage.write_text(where["metrics"], json.dumps(summary, indent=2), options)
    return summary


def percent(fraction: float) -> float:
    """A metric as the reports show it: percent, rounded to 1e-4 (NaN stays NaN)."""
    return round(100.0 * float(fraction), 4)


EVALUATE = Stage("evaluate", main=evaluate, device="cpu",
                 products=lambda s: [str(v) for v in report_locations(s).values()])
