"""Dataset-level semantic segmentation metrics: mIoU, aAcc, mAcc and Boundary IoU (mBIoU).

Conventions (mmseg / DDPS):

* Pixels whose ground truth equals ``ignore_index`` are dropped from both maps for the area
  statistics. ``ignore_index`` may be a class id (``0 <= ignore_index < K``, DDPM-Seg's
  bedroom_28 ignores its class 0): that class is then *the ignored class*. Its ground-truth
  pixels are dropped like any ignore pixel, a prediction of it on a valid pixel is a miss of
  that pixel's class, and its IoU, Boundary IoU and accuracy are NaN, so no mean counts it. Per-class intersection, union, prediction area and label area are *summed over
  the dataset*; ``IoU_c = I_c / U_c`` (NaN when ``U_c == 0``), ``mIoU = nanmean(IoU)``,
  ``aAcc = sum(I) / sum(label area)``, ``mAcc = nanmean(I_c / label_area_c)``. A prediction
  value outside ``[0, K)`` is an error naming the image (a prediction is a class id per
  pixel; a value that is none is a broken predictor or the wrong ``K``, not a miss).
* Boundary IoU: per class, the band of width ``d = boundary_width(H, W, boundary_ratio)`` of
  the ground-truth mask and of the predicted mask (see :mod:`ddps_core.metrics.boundary`);
  band intersections and unions are summed over the dataset, ``bIoU_c = I_c / U_c``.
  Ground-truth ignore pixels belong to no class (they are "outside" every GT mask and in no GT
  band); the predicted bands are computed on the full prediction, ignore positions included.
* A class absent from both maps on the scored (non-ignored) pixels has no score at all: its
  IoU, bIoU and accuracy are all NaN, even when its predicted band reaches into ignored
  pixels. So a ground truth that is all ignore gives NaN for every metric, never a 0 for
  one and NaN for another.
* Each image's own mIoU (nanmean of its per-image IoU) is recorded with its image id.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ddps_core.errors import ConfigError, DataError
from ddps_core.metrics.boundary import boundary_band, boundary_width

__all__ = [
    "ConfusionAccumulator",
    "SegmentationResult",
    "as_label_map",
    "evaluate_arrays",
]


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return math.nan
    return float(np.nanmean(values))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def as_label_map(array: np.ndarray, what: str) -> np.ndarray:
    """Validate a 2-D class-id map and return it as a signed integer array.

    Integer and boolean arrays are accepted; floating-point arrays only when every value is a
    finite whole number. ``what`` names the source in the :class:`DataError` message.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise DataError(f"{what}: expected a 2-D (H x W) map of class ids, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{what}: empty label map of shape {array.shape}")
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.int64)
    if kind in "iu":
        if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
            raise DataError(f"{what}: class ids too large for int64")
        return array.astype(np.int64, copy=False)
    if kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise DataError(
                f"{what}: floating-point map contains non-integer or non-finite values; "
                "expected class ids"
            )
        return array.astype(np.int64)
    raise DataError(f"{what}: unsupported dtype {array.dtype}; expected integer class ids")


def _shown(values: np.ndarray) -> str:
    """The distinct ``values``, at most ten, for an error message."""
    distinct = np.unique(values)
    return ", ".join(str(v) for v in distinct[:10]) + (" ..." if distinct.size > 10 else "")


@dataclass
class SegmentationResult:
    """Dataset-level metrics. All per-class arrays have length ``num_classes``.

    Integer arrays (int64): ``area_intersect``, ``area_union``, ``area_pred``, ``area_label``,
    ``boundary_intersect``, ``boundary_union``. Float arrays (float64, NaN where undefined):
    ``iou``, ``biou``, ``acc``. ``summary`` holds ``miou``, ``mbiou``, ``aacc``, ``macc``;
    ``per_image`` is a list of ``(image_id, miou)`` in the order the images were added.
    """

    num_classes: int
    ignore_index: int
    boundary_ratio: float
    area_intersect: np.ndarray
    area_union: np.ndarray
    area_pred: np.ndarray
    area_label: np.ndarray
    boundary_intersect: np.ndarray
    boundary_union: np.ndarray
    iou: np.ndarray
    biou: np.ndarray
    acc: np.ndarray
    summary: dict[str, float]
    per_image: list[tuple[str, float]] = field(default_factory=list)

    @property
    def miou(self) -> float:
        return self.summary["miou"]

    @property
    def mbiou(self) -> float:
        return self.summary["mbiou"]

    @property
    def aacc(self) -> float:
        return self.summary["aacc"]

    @property
    def macc(self) -> float:
        return self.summary["macc"]

    @property
    def num_images(self) -> int:
        return len(self.per_image)


class ClassSettingsError(ConfigError, ValueError):
    """``num_classes`` / ``ignore_index`` that cannot score anything (a ValueError too)."""


class ConfusionAccumulator:
    """Accumulates per-class areas and boundary-band areas over a dataset.

    ``update(pred, gt)`` costs O(H*W) per image whatever the number of classes and the band
    width: one edge map and one running-maximum dilation per label map, then ``bincount``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, boundary_ratio: float = 0.02):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ClassSettingsError(f"num_classes: must be an integer, got {num_classes!r}")
        if num_classes < 1:
            raise ClassSettingsError(f"num_classes: must be >= 1, got {num_classes}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise ClassSettingsError(f"ignore_index: must be an integer, got {ignore_index!r}")
        if ignore_index < 0:
            raise ClassSettingsError(f"ignore_index: must not be negative, got {ignore_index}")
        boundary_width(1, 1, boundary_ratio)  # validates the ratio
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.boundary_ratio = float(boundary_ratio)
        k = self.num_classes
        self.area_intersect = np.zeros(k, dtype=np.int64)
        self.area_pred = np.zeros(k, dtype=np.int64)
        self.area_label = np.zeros(k, dtype=np.int64)
        self.boundary_intersect = np.zeros(k, dtype=np.int64)
        self.boundary_pred = np.zeros(k, dtype=np.int64)
        self.boundary_label = np.zeros(k, dtype=np.int64)
        self.per_image: list[tuple[str, float]] = []
        #: classes that are scored: all K, but the ignored class when ignore_index is a class id
        self.scored = np.ones(k, dtype=bool)
        if self.ignore_index < k:
            self.scored[self.ignore_index] = False

    def _unscored(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float, per class) with NaN for the ignored class."""
        return np.where(self.scored, values, np.nan)

    def _count(self, values: np.ndarray) -> np.ndarray:
        """Histogram of ``values`` over ``[0, K)``; values outside the range are not counted."""
        k = self.num_classes
        values = values[(values >= 0) & (values < k)]
        return np.bincount(values, minlength=k).astype(np.int64, copy=False)

    def update(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        image_id: str | None = None,
        *,
        source: str | None = None,
    ) -> None:
        """Add one image. ``pred`` and ``gt`` are ``H x W`` integer class-id maps.

        Raises :class:`DataError` (naming ``source``, else ``image_id``) when a map is not 2-D
        integer data, when the shapes differ, when the ground truth holds a value that is
        neither a class id in ``[0, K)`` nor ``ignore_index``, or when the prediction holds a
        value outside ``[0, K)``.
        """
        if image_id is None:
            image_id = f"image_{len(self.per_image)}"
        image_id = str(image_id)
        where = source if source is not None else f"image {image_id!r}"
        pred = as_label_map(pred, f"{where} (prediction)")
        gt = as_label_map(gt, f"{where} (ground truth)")
        if pred.shape != gt.shape:
            raise DataError(
                f"{where}: prediction shape {pred.shape} differs from ground truth shape {gt.shape}"
            )
        k = self.num_classes
        ignore = gt == self.ignore_index
        bad = ~ignore & ((gt < 0) | (gt >= k))
        if bad.any():
            raise DataError(
                f"{where}: ground truth holds value(s) {_shown(gt[bad])} outside [0, {k}) "
                f"that are not ignore_index={self.ignore_index}"
            )
        wrong = (pred < 0) | (pred >= k)
        if wrong.any():
            raise DataError(
                f"{where}: prediction holds value(s) {_shown(pred[wrong])} outside the class ids [0, {k}) "
                f"(num_classes={k}); a prediction must be a class id at every pixel"
            )

        # Area statistics on non-ignored pixels.
        valid = ~ignore
        gt_v = gt[valid]
        pred_v = pred[valid]
        intersect = self._count(gt_v[gt_v == pred_v])
        area_pred = self._count(pred_v)
        area_label = np.bincount(gt_v, minlength=k).astype(np.int64, copy=False)

        # Boundary bands: one dilation per map serves all classes.
        d = boundary_width(gt.shape[0], gt.shape[1], self.boundary_ratio)
        gt_band = boundary_band(gt, d) & valid  # ignore pixels are in no GT band
        pred_band = boundary_band(pred, d)
        both = gt_band & pred_band & (gt == pred)
        b_intersect = np.bincount(gt[both], minlength=k).astype(np.int64, copy=False)
        b_label = np.bincount(gt[gt_band], minlength=k).astype(np.int64, copy=False)
        b_pred = self._count(pred[pred_band])

        self.area_intersect += intersect
        self.area_pred += area_pred
        self.area_label += area_label
        self.boundary_intersect += b_intersect
        self.boundary_label += b_label
        self.boundary_pred += b_pred

        union = area_pred + area_label - intersect
        self.per_image.append((image_id, _nanmean(self._unscored(_ratio(intersect, union)))))

    def result(self) -> SegmentationResult:
        """Metrics over everything added so far (arrays are copies)."""
        union = self.area_pred + self.area_label - self.area_intersect
        b_union = self.boundary_pred + self.boundary_label - self.boundary_intersect
        biou = _ratio(self.boundary_intersect, b_union)
        biou[union == 0] = np.nan  # no score where the class has none (see the module text)
        iou = self._unscored(_ratio(self.area_intersect, union))
        biou = self._unscored(biou)
        acc = self._unscored(_ratio(self.area_intersect, self.area_label))
        total = int(self.area_label.sum())
        summary = {
            "miou": _nanmean(iou),
            "mbiou": _nanmean(biou),
            "aacc": float(self.area_intersect.sum() / total) if total > 0 else math.nan,
            "macc": _nanmean(acc),
        }
        return SegmentationResult(
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            boundary_ratio=self.boundary_ratio,
            area_intersect=self.area_intersect.copy(),
            area_union=union,
            area_pred=self.area_pred.copy(),
            area_label=self.area_label.copy(),
            boundary_intersect=self.boundary_intersect.copy(),
            boundary_union=b_union,
            iou=iou,
            biou=biou,
            acc=acc,
            summary=summary,
            per_image=list(self.per_image),
        )


def evaluate_arrays(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
    num_classes: int,
    ignore_index: int = 255,
    boundary_ratio: float = 0.02,
) -> SegmentationResult:
    """Evaluate ``(image_id, pred, gt)`` triples and return the dataset-level result."""
    acc = ConfusionAccumulator(num_classes, ignore_index=ignore_index, boundary_ratio=boundary_ratio)
    for image_id, pred, gt in pairs:
        acc.update(pred, gt, image_id)
    return acc.result()

