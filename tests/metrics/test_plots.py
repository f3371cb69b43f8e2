"""The DVC plot tables cut from the reports, checked against hand counts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ddps_core.metrics import ConfusionAccumulator, plots, report_frame


def _report(method: str, pred: np.ndarray, gt: np.ndarray, step=None) -> pd.DataFrame:
    acc = ConfusionAccumulator(num_classes=3)
    acc.update(pred, gt, "img0")
    frame = report_frame(acc.result(), ["bg", "a", "b"])
    frame.insert(0, "method", method)
    if step is not False:
        frame.insert(1, "step", pd.array([step] * len(frame), dtype="Int64"))
    return frame


def test_per_class_table_holds_each_methods_class_iou_in_percent():
    gt = np.zeros((8, 8), np.int64)
    gt[:, 4:] = 1
    gt[6:, :] = 2
    pred = gt.copy()
    pred[0, 4] = 0  # one class-1 pixel called background
    report = pd.concat([_report("teacher", pred, gt, step=False), _report("rgbxy", gt, gt, step=False)])
    tables = plots.by_method(plots.per_class_table(report))
    assert list(tables) == ["teacher", "rgbxy"]
    teacher = tables["teacher"].set_index("class_name")
    # by hand: class 1 has 24 label pixels (rows 0-5, columns 4-7), 23 predicted right
    assert np.isclose(teacher.loc["a", "iou"], 100 * 23 / 24)
    # background: 24 label pixels, 25 predicted, 24 right
    assert np.isclose(teacher.loc["bg", "iou"], 100 * 24 / 25)
    assert np.isclose(teacher.loc["b", "iou"], 100.0)
    assert np.allclose(tables["rgbxy"]["iou"], 100.0)
    assert list(tables["rgbxy"].columns) == ["class_id", "class_name", "iou", "biou"]


def test_refine_step_table_puts_the_student_at_step_minus_one():
    gt = np.zeros((8, 8), np.int64)
    gt[:4] = 1
    worse = gt.copy()
    worse[:2] = 0
    report = pd.concat([_report("student", worse, gt, step=None),
                        _report("refiner", gt, gt, step=5), _report("refiner", worse, gt, step=0)])
    tables = plots.by_method(plots.refine_step_table(report))
    assert tables["student"]["step"].tolist() == [-1]
    assert tables["refiner"]["step"].tolist() == [0, 5]  # sorted by step
    assert np.isclose(tables["refiner"]["miou"].iloc[1], 100.0)
    csv = plots.to_csv(tables["refiner"])
    assert csv.splitlines()[0] == "step,miou,mbiou"
