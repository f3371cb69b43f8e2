"""Stage report: the wide plot tables checked against hand counts, and the pictures drawn
from the label PNGs; changing how many pictures to draw touches nothing else."""

import numpy as np
import pandas as pd
import pytest

from ddps_core.metrics import ConfusionAccumulator, report_frame
from ddps_core.viz.stage import METHODS, per_class_tables, refine_step_tables


def _report(method: str, pred: np.ndarray, gt: np.ndarray, step=False) -> pd.DataFrame:
    acc = ConfusionAccumulator(num_classes=3)
    acc.update(pred, gt, "img0")
    frame = report_frame(acc.result(), ["bg", "a", "b"])
    frame.insert(0, "method", method)
    if step is not False:
        frame.insert(1, "step", pd.array([step] * len(frame), dtype="Int64"))
    return frame


def test_per_class_table_has_one_column_per_method_in_percent():
    gt = np.zeros((8, 8), np.int64)
    gt[:, 4:] = 1
    gt[6:, :] = 2
    pred = gt.copy()
    pred[0, 4] = 0  # one class-1 pixel called background
    tables = per_class_tables(pd.concat([_report("teacher", pred, gt), _report("rgbxy", gt, gt)]))
    iou = tables["iou"].set_index("class_name")
    assert list(tables["iou"].columns) == ["class_id", "class_name", *METHODS]
    # by hand: class 1 has 24 label pixels (rows 0-5, columns 4-7), 23 predicted right
    assert iou.loc["a", "teacher"] == pytest.approx(100 * 23 / 24)
    # background: 24 label pixels, 25 predicted, 24 right
    assert iou.loc["bg", "teacher"] == pytest.approx(100 * 24 / 25)
    assert iou.loc["b", "teacher"] == pytest.approx(100.0)
    assert (iou["rgbxy"] == 100.0).all() and iou["student"].isna().all()  # a method that did not run: empty
    assert list(tables["biou"]["class_name"]) == ["bg", "a", "b"]


def test_per_class_table_takes_the_refiner_at_its_last_step():
    gt = np.zeros((8, 8), np.int64)
    gt[:4] = 1
    worse = gt.copy()
    worse[:2] = 0  # 16 of class 1's 32 pixels called background
    refine = pd.concat([_report("student", worse, gt, step=None), _report("refiner", worse, gt, step=0),
                        _report("refiner", gt, gt, step=4)])
    teacher = _report("teacher", worse, gt)
    iou = per_class_tables(teacher, refine)["iou"].set_index("class_name")
    assert iou["refiner"].tolist()[:2] == pytest.approx([100.0, 100.0])  # step 4, not step 0
    # by hand, the teacher: background 32 / 48, class 1 16 / 32; the refine report's student (no step) is
    # not taken: the student's column stays the evaluate report's (empty here)
    assert iou["teacher"].tolist()[:2] == pytest.approx([100 * 32 / 48, 50.0])
    assert iou["student"].isna().all() and iou["refiner-gt"].isna().all()


def test_refine_step_table_repeats_the_student_on_every_step():
    gt = np.zeros((8, 8), np.int64)
    gt[:4] = 1
    worse = gt.copy()
    worse[:2] = 0
    report = pd.concat([_report("student", worse, gt, step=None),
                        _report("refiner", gt, gt, step=5), _report("refiner", worse, gt, step=0)])
    table = refine_step_tables(report)["miou"]
    assert list(table["step"]) == [0, 5]  # sorted by step
    assert table["refiner"].tolist() == pytest.approx([table["student"].iloc[0], 100.0])
    # the student, by hand: background IoU 32/48 (rows 0-1 and 4-7 predicted), class 1 16/32
    assert table["student"].tolist() == pytest.approx([100 * (32 / 48 + 16 / 32) / 2] * 2)
    assert table["refiner-gt"].isna().all()
