"""The ignored class: an ignore index that is a class id (DDPM-Seg's bedroom_28: 29 slots,
class 0 ignored). Its ground-truth pixels are dropped, a prediction of it on a valid pixel is
a miss, and its IoU is NaN so that no mean counts it. Every expected figure is counted by hand
below, not computed by the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddps_core.metrics import ConfusionAccumulator, evaluate_arrays

#   gt    0 1 1 2      pred  1 1 0 2
#         0 2 3 3            2 2 3 1
# Valid pixels (gt != 0): (0,1) 1->1 hit, (0,2) 1->0 miss, (0,3) 2->2 hit,
#                         (1,1) 2->2 hit, (1,2) 3->3 hit,  (1,3) 3->1 miss.
# The two gt-0 pixels (predicted 1 and 2) are dropped.
GT = np.array([[0, 1, 1, 2], [0, 2, 3, 3]])
PRED = np.array([[1, 1, 0, 2], [2, 2, 3, 1]])
# class 1: label {(0,1),(0,2)}, pred on valid {(0,1),(1,3)}: I 1, U 3
# class 2: label {(0,3),(1,1)}, pred {(0,3),(1,1)}:            I 2, U 2
# class 3: label {(1,2),(1,3)}, pred {(1,2)}:                   I 1, U 2
HAND_IOU = {1: 1 / 3, 2: 1.0, 3: 1 / 2}


@pytest.mark.parametrize("k", [4, 29])  # 29: bedroom_28's slots; classes 4..28 absent here
def test_the_ignored_class_is_in_no_mean_and_its_pixels_in_no_area(k):
    result = evaluate_arrays([("a", PRED, GT)], num_classes=k, ignore_index=0, boundary_ratio=0.5)
    for c, iou in HAND_IOU.items():
        assert result.iou[c] == pytest.approx(iou)
    assert math.isnan(result.iou[0]) and math.isnan(result.biou[0]) and math.isnan(result.acc[0])
    assert np.isnan(result.iou[4:]).all()
    assert result.miou == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # 11/18; with class 0 as an IoU of 0: 11/24
    assert result.area_label.tolist()[:4] == [0, 2, 2, 2]  # no gt-0 pixel is counted
    assert result.area_pred.tolist()[:4] == [1, 2, 2, 1]  # predictions on valid pixels only
    assert result.aacc == pytest.approx(4 / 6)
    assert result.macc == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert result.per_image[0][1] == pytest.approx(11 / 18)
    assert not math.isnan(result.mbiou)


def test_an_ignore_index_outside_the_classes_is_unchanged():
    """255 with K = 4: class 0 is an ordinary class (its IoU is 0 here: predicted once, never
    true), so the same maps give another mIoU."""
    gt = np.where(GT == 0, 255, GT)
    result = evaluate_arrays([("a", PRED, gt)], num_classes=4, ignore_index=255)
    assert result.iou[0] == 0.0
    assert result.miou == pytest.approx((0 + 1 / 3 + 1 + 1 / 2) / 4)


def test_the_accumulator_names_its_scored_classes():
    acc = ConfusionAccumulator(29, ignore_index=0)
    assert acc.scored.sum() == 28 and not acc.scored[0]
    assert ConfusionAccumulator(29, ignore_index=255).scored.all()
