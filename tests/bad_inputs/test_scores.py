"""Scoring (``ddps score``, the evaluate stage's scorer): a prediction that is not a class id
at every pixel is refused, a ground truth with nothing to score gives NaN for every metric,
and class settings that cannot score anything are one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.bad_inputs.conftest import assert_clear_error, snapshot


@pytest.fixture
def scored(tmp_path, cli):
    """Ground truth and predictions (K = 3), and an earlier report: ``(args, pred, report)``."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        label = rng.integers(0, 3, (16, 16), dtype=np.uint8)
        np.save(gt / f"im{i}.npy", label)
        np.save(pred / f"im{i}.npy", np.where(rng.random((16, 16)) < 0.7, label, (label + 1) % 3).astype(np.uint8))
    report = tmp_path / "reports" / "report.parquet"
    args = ["score", "--pred", pred, "--gt", gt, "--num-classes", "3", "--out", report]
    assert cli(*args).code == 0
    return args, pred, report


@pytest.mark.parametrize("value", [3, 255, -1])
def test_a_prediction_value_that_is_no_class_id_is_refused(scored, cli, value):
    args, pred, report = scored
    before = snapshot(report.parent)
    bad = pred / "im1.npy"
    p = np.load(bad).astype(np.int16)
    p[4, 5] = value
    np.save(bad, p)
    res = cli(*args)
    assert_clear_error(res, bad, f"prediction holds value(s) {value} outside the class ids [0, 3)")
    assert snapshot(report.parent) == before


def test_a_ground_truth_that_is_all_ignore_scores_nan_everywhere(tmp_path, cli):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    np.save(gt / "a.npy", np.full((8, 8), 255, np.uint8))
    p = np.zeros((8, 8), np.uint8)
    p[2:6, 2:6] = 1  # predicted regions have bands; nothing is scored under an ignored truth
    np.save(pred / "a.npy", p)
    out = tmp_path / "r.parquet"
    res = cli("score", "--pred", pred, "--gt", gt, "--num-classes", "3", "--out", out)
    assert res.code == 0, res.err
    df = pd.read_parquet(out)
    summary = df[df.scope == "summary"].iloc[0]
    for metric in ("miou", "mbiou", "aacc", "macc"):
        assert np.isnan(summary[metric]), (metric, summary[metric])
    classes = df[df.scope == "class"]
    assert classes[["iou", "biou", "acc"]].isna().all().all()
    assert "mIoU nan mBIoU nan aAcc nan mAcc nan" in " ".join(res.out.split())


def test_num_classes_zero_is_one_line(scored, cli):
    args, _, report = scored
    before = snapshot(report.parent)
    res = cli(*[a if a != "3" else "0" for a in args])
    assert res.code == 2
    assert_clear_error(res, "--num-classes", "greater than or equal to 1")
    assert snapshot(report.parent) == before


def test_an_ignore_index_that_is_a_class_id_ignores_that_class(scored, cli):
    """Not a fault: the class is the ignored class (bedroom_28's convention), NaN in the report
    and in no mean (tests/metrics/test_ignored_class.py has the hand-counted case)."""
    args, _, report = scored
    res = cli(*args, "--ignore-index", "1")
    assert res.code == 0, res.err
    frame = pd.read_parquet(report)
    row = frame[(frame["scope"] == "class") & (frame["class_id"] == 1)].iloc[0]
    assert np.isnan(row["iou"]) and row["area_label"] == 0
