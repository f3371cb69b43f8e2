"""Tests of ddps_core.metrics against hand-computed numbers and independent brute-force code.

Nothing here reuses the library's band computation: the references below erode each class
mask separately, the way the DDPS / mmseg Boundary IoU code does.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ddps_core.errors import DataError
from ddps_core.metrics import (
    REPORT_COLUMNS,
    ConfusionAccumulator,
    boundary_band,
    boundary_width,
    evaluate_arrays,
    evaluate_dirs,
    load_class_names,
    report_frame,
    write_report,
)

IGN = 255


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def ref_band_numpy(mask: np.ndarray, d: int) -> np.ndarray:
    """Reference band: pad with one ring of zeros, erode d times with a 3x3 ones kernel
    (pixels beyond the padded frame never erode anything, as with cv2.erode's default border),
    crop, band = mask & ~eroded. Pure numpy slicing."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    h, w = m.shape
    for _ in range(d):
        p = np.pad(m, 1, constant_values=True)
        out = np.ones_like(m)
        for dy in range(3):
            for dx in range(3):
                out &= p[dy : dy + h, dx : dx + w]
        m = out
    return mask.astype(bool) & ~m[1:-1, 1:-1]


def ref_band_torch(mask: np.ndarray, d: int) -> np.ndarray:
    """Same reference with torch: erosion = -max_pool2d(-x) (max_pool2d pads with -inf, so
    only the explicit zero ring erodes from outside)."""
    x = torch.from_numpy(np.pad(mask.astype(np.float32), 1))[None, None]
    for _ in range(d):
        x = -torch.nn.functional.max_pool2d(-x, kernel_size=3, stride=1, padding=1)
    eroded = x[0, 0, 1:-1, 1:-1].numpy() > 0.5
    return mask.astype(bool) & ~eroded


def ref_evaluate(pairs, k, ignore=IGN, ratio=0.02):
    """Naive per-class, per-image evaluation with per-class erosions."""
    ai = np.zeros(k, np.int64)
    ap = np.zeros(k, np.int64)
    al = np.zeros(k, np.int64)
    bi = np.zeros(k, np.int64)
    bu = np.zeros(k, np.int64)
    per_image = []
    for image_id, pred, gt in pairs:
        h, w = gt.shape
        d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
        valid = gt != ignore
        img_iou = []
        for c in range(k):
            g = (gt == c) & valid
            p = (pred == c) & valid
            i, u = int((g & p).sum()), int((g | p).sum())
            ai[c] += i
            ap[c] += int(p.sum())
            al[c] += int(g.sum())
            img_iou.append(i / u if u else np.nan)
            gb = ref_band_numpy(gt == c, d)  # ignore != c: outside, and never in a GT band
            pb = ref_band_numpy(pred == c, d)  # full prediction, ignore positions included
            bi[c] += int((gb & pb).sum())
            bu[c] += int((gb | pb).sum())
        vals = [v for v in img_iou if not np.isnan(v)]
        per_image.append((image_id, sum(vals) / len(vals) if vals else np.nan))
    return ai, ap, al, bi, bu, per_image


def structured_labels(rng, h, w, k, ignore_frac=0.0):
    """Blocky random label map (nearest-upsampled coarse grid plus a few rectangles)."""
    gh, gw = max(1, h // rng.integers(2, 6)), max(1, w // rng.integers(2, 6))
    coarse = rng.integers(0, k, size=(gh, gw))
    lab = coarse[np.arange(h) * gh // h][:, np.arange(w) * gw // w]
    for _ in range(rng.integers(0, 4)):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        lab[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = rng.integers(0, k)
    if ignore_frac:
        ign = rng.random((h, w)) < ignore_frac
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        ign[y0 : y0 + h // 3 + 1, x0 : x0 + w // 3 + 1] = True
        lab = np.where(ign, IGN, lab)
    return lab.astype(np.int64)


# --------------------------------------------------------------------------------------------
# boundary_width / boundary_band
# --------------------------------------------------------------------------------------------


def test_boundary_width():
    assert boundary_width(512, 512) == 14  # 0.02 * 724.08 = 14.48 -> 14
    assert boundary_width(5, 9) == 1  # 0.02 * 10.30 = 0.21 -> 0 -> at least 1
    assert boundary_width(5, 9, ratio=0.2) == 2  # 0.2 * 10.30 = 2.06 -> 2
    assert boundary_width(1000, 2000) == 45  # 0.02 * 2236.07 = 44.72 -> 45
    assert boundary_width(512, 683, ratio=0.0) == 1
    with pytest.raises(ValueError):
        boundary_width(4, 4, ratio=-0.1)


def test_references_agree():
    rng = np.random.default_rng(1)
    for _ in range(5):
        m = rng.random((11, 17)) < 0.7
        for d in (1, 2, 4):
            np.testing.assert_array_equal(ref_band_numpy(m, d), ref_band_torch(m, d))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (13, 13), (17, 29), (40, 23)])
@pytest.mark.parametrize("d", [1, 2, 3, 5, 9, 40])
def test_band_matches_per_class_erosion(shape, d):
    rng = np.random.default_rng(hash((shape, d)) % 2**32)
    for trial in range(3):
        k = int(rng.integers(1, 11))
        lab = structured_labels(rng, *shape, k, ignore_frac=0.05 if trial else 0.0)
        if trial == 2:  # salt-and-pepper noise on top: many tiny regions
            noise = rng.random(shape) < 0.1
            lab = np.where(noise, rng.integers(0, k, shape), lab)
        band = boundary_band(lab, d)
        for c in list(range(k)) + [IGN]:
            ref = ref_band_numpy(lab == c, d)
            np.testing.assert_array_equal(band & (lab == c), ref, err_msg=f"class {c}")
        # every pixel belongs to exactly one value's region, so the union equals the band
        union = np.zeros(shape, bool)
        for v in np.unique(lab):
            union |= ref_band_numpy(lab == v, d)
        np.testing.assert_array_equal(band, union)


def test_band_hand_computed_5x9():
    # one region covering a 5x9 image: the border counts as outside, so with d=1 the band is
    # the outer ring: 45 - 3*7 = 24 pixels; with d=2: 45 - 1*5 = 40 pixels.
    lab = np.zeros((5, 9), int)
    assert boundary_band(lab, 1).sum() == 24
    assert boundary_band(lab, 2).sum() == 40
    assert boundary_band(lab, 3).sum() == 45
    assert not boundary_band(lab, 2)[2, 2:7].any()


def test_band_torch_reference_random():
    rng = np.random.default_rng(7)
    for shape, d in [((31, 47), 3), ((64, 20), 6)]:
        lab = structured_labels(rng, *shape, 8, ignore_frac=0.05)
        band = boundary_band(lab, d)
        for c in range(8):
            assert int((band & (lab == c)).sum()) == int(ref_band_torch(lab == c, d).sum())


# --------------------------------------------------------------------------------------------
# Hand-computed metrics
# --------------------------------------------------------------------------------------------


def test_hand_absent_classes_ignore_and_kept_pred_bands():
    gt = np.array([[0, 0, 1], [0, IGN, 1]])
    pred = np.array([[0, 1, 1], [0, 0, 3]])
    r = evaluate_arrays([("a", pred, gt)], num_classes=4)
    # valid (gt, pred) pairs: (0,0) (0,1) (1,1) | (0,0) [ignored] (1,3)
    # class 0: I=2, pred=2 (the 0 under ignore is dropped), label=3, U=2+3-2=3 -> 2/3
    # class 1: I=1, pred=2, label=2, U=3 -> 1/3
    # class 2: absent from both -> NaN
    # class 3: predicted, not in GT: I=0, U=1 -> 0
    np.testing.assert_array_equal(r.area_intersect, [2, 1, 0, 0])
    np.testing.assert_array_equal(r.area_pred, [2, 2, 0, 1])
    np.testing.assert_array_equal(r.area_label, [3, 2, 0, 0])
    np.testing.assert_array_equal(r.area_union, [3, 3, 0, 1])
    np.testing.assert_allclose(r.iou, [2 / 3, 1 / 3, np.nan, 0.0])
    assert r.summary["miou"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert r.summary["aacc"] == pytest.approx(3 / 5)  # 3 correct of 5 valid
    np.testing.assert_allclose(r.acc, [2 / 3, 1 / 2, np.nan, np.nan])
    assert r.summary["macc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # boundary: 2x3 image -> d = max(1, round(0.02*3.61)) = 1; every pixel touches the border,
    # so each band is the whole mask.
    # GT bands:   c0 {(0,0),(0,1),(1,0)} (ignore pixel in none), c1 {(0,2),(1,2)}
    # pred bands: c0 {(0,0),(1,0),(1,1)} (pixel under GT-ignore kept), c1 {(0,1),(0,2)}, c3 {(1,2)}
    # c0: I=2, U=3+3-2=4 -> 1/2;  c1: I=1, U=2+2-1=3 -> 1/3;  c2: NaN;  c3: I=0, U=1 -> 0
    np.testing.assert_array_equal(r.boundary_intersect, [2, 1, 0, 0])
    np.testing.assert_array_equal(r.boundary_union, [4, 3, 0, 1])
    np.testing.assert_allclose(r.biou, [1 / 2, 1 / 3, np.nan, 0.0])
    assert r.summary["mbiou"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert r.per_image == [("a", pytest.approx(1 / 3))]


def test_hand_non_square_border_is_outside():
    # 5x9 GT entirely class 1; prediction class 1 except class 0 at the centre (2,4).
    gt = np.ones((5, 9), int)
    pred = gt.copy()
    pred[2, 4] = 0
    # areas: class 1: I=44, pred=44, label=45, U=45 -> 44/45; class 0: I=0, U=1 -> 0
    # d=1 (0.02*10.3 -> 0 -> 1):
    #   GT band c1 = outer ring = 45 - 3*7 = 24
    #   pred band c1 = ring 24 + the 8 (interior) neighbours of (2,4) = 32; pred band c0 = 1
    #   c1: I=24, U=24+32-24=32 -> 0.75;  c0: I=0, U=1 -> 0
    r = evaluate_arrays([("x", pred, gt)], num_classes=2)
    np.testing.assert_allclose(r.iou, [0.0, 44 / 45])
    np.testing.assert_array_equal(r.boundary_intersect, [0, 24])
    np.testing.assert_array_equal(r.boundary_union, [1, 32])
    assert r.summary["mbiou"] == pytest.approx((0 + 0.75) / 2)
    # d=2 (0.2*10.3 = 2.06 -> 2):
    #   GT band c1 = all but pixels >= 3 from outside: row 2, cols 2..6 -> 45-5 = 40
    #   pred band c1: (2,2),(2,3),(2,5),(2,6) are within 2 of (2,4) -> all 44 class-1 pixels
    #   c1: I=40, U=40+44-40=44 -> 10/11
    r2 = evaluate_arrays([("x", pred, gt)], num_classes=2, boundary_ratio=0.2)
    np.testing.assert_array_equal(r2.boundary_intersect, [0, 40])
    np.testing.assert_array_equal(r2.boundary_union, [1, 44])
    np.testing.assert_allclose(r2.biou, [0.0, 10 / 11])


def test_hand_gt_ignore_is_outside_for_gt_bands():
    # 5x5 GT all class 0 except ignore at the centre; d = max(1, round(0.02*7.07)) = 1
    gt = np.zeros((5, 5), int)
    gt[2, 2] = IGN
    # (a) prediction all class 0
    #   GT band c0: ring 16 + 8 neighbours of the ignore pixel = 24 (ignore is "outside")
    #   pred band c0: ring 16 -> I=16, U=24+16-16=24 -> 2/3; IoU c0 = 24/24 = 1
    r = evaluate_arrays([("a", np.zeros((5, 5), int), gt)], num_classes=2)
    np.testing.assert_array_equal(r.boundary_intersect, [16, 0])
    np.testing.assert_array_equal(r.boundary_union, [24, 0])
    np.testing.assert_allclose(r.biou, [2 / 3, np.nan])
    np.testing.assert_allclose(r.iou, [1.0, np.nan])
    # (b) prediction class 1 at the ignored centre
    #   IoU: the centre is dropped -> class 1 has U=0 -> NaN; mIoU = 1
    #   pred band c0 = 16 + 8 = 24 = GT band c0 -> bIoU 1
    #   pred band c1 = {(2,2)} is counted although GT is ignore there (U=1), but class 1 has no
    #   scored pixel in either map, so like its IoU its bIoU is NaN (not 0); mBIoU = 1
    pred = np.zeros((5, 5), int)
    pred[2, 2] = 1
    r = evaluate_arrays([("b", pred, gt)], num_classes=2)
    np.testing.assert_allclose(r.iou, [1.0, np.nan])
    assert r.summary["miou"] == 1.0
    np.testing.assert_array_equal(r.boundary_intersect, [24, 0])
    np.testing.assert_array_equal(r.boundary_union, [24, 1])
    np.testing.assert_allclose(r.biou, [1.0, np.nan])
    assert r.summary["mbiou"] == pytest.approx(1.0)


def test_hand_dataset_sum_differs_from_per_image_mean():
    a_gt, a_pred = np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]])
    b_gt, b_pred = np.array([[0, 1, 1, 1]]), np.array([[1, 1, 1, 1]])
    # image a: c0 I=4,U=4 -> 1; c1 NaN -> mIoU 1
    # image b: c0 I=0, U=1 -> 0; c1 I=3, U=4 -> 0.75 -> mIoU 0.375
    # mean of per-image mIoU = (1 + 0.375) / 2 = 0.6875
    # dataset sums: c0 I=4, pred=4, label=5, U=5 -> 0.8; c1 I=3, U=4 -> 0.75 -> mIoU 0.775
    r = evaluate_arrays([("a", a_pred, a_gt), ("b", b_pred, b_gt)], num_classes=2)
    np.testing.assert_allclose(r.iou, [0.8, 0.75])
    assert r.summary["miou"] == pytest.approx(0.775)
    assert r.per_image == [("a", 1.0), ("b", 0.375)]
    assert np.mean([m for _, m in r.per_image]) == pytest.approx(0.6875)
    assert r.summary["aacc"] == pytest.approx(7 / 8)
    assert r.summary["macc"] == pytest.approx((4 / 5 + 3 / 3) / 2)


@pytest.mark.parametrize("value", [7, 2, -1, 255])
def test_hand_prediction_out_of_range_is_an_error_naming_the_image_and_value(value):
    gt = np.array([[0, 1, 255]])
    pred = np.array([[value, 1, 0]])  # 255 too: a prediction is a class id, never "ignore"
    with pytest.raises(DataError, match=rf"img-o.*prediction holds value\(s\) {value} outside the class ids \[0, 2\)"):
        evaluate_arrays([("img-o", pred, gt)], num_classes=2)


def test_all_ignore_image_and_empty_result():
    r = evaluate_arrays([("z", np.zeros((3, 3), int), np.full((3, 3), IGN))], num_classes=2)
    assert np.isnan(r.summary["miou"]) and np.isnan(r.summary["aacc"])
    assert np.isnan(r.per_image[0][1])
    # the predicted band of class 0 is counted (8 pixels), but no class has a scored pixel:
    # every metric of every class is NaN, bIoU included
    np.testing.assert_array_equal(r.boundary_union, [8, 0])
    assert np.isnan(r.iou).all() and np.isnan(r.biou).all() and np.isnan(r.acc).all()
    assert all(np.isnan(r.summary[m]) for m in ("miou", "mbiou", "aacc", "macc"))
    empty = ConfusionAccumulator(3).result()
    assert np.isnan(empty.summary["mbiou"]) and empty.per_image == []


# --------------------------------------------------------------------------------------------
# Random data vs the naive reference evaluator
# --------------------------------------------------------------------------------------------


def test_random_dataset_matches_reference():
    rng = np.random.default_rng(123)
    k = 7
    pairs = []
    for i, shape in enumerate([(30, 30), (21, 50), (64, 17), (9, 9), (55, 70)]):
        gt = structured_labels(rng, *shape, k, ignore_frac=0.03)
        pred = structured_labels(rng, *shape, k)
        keep = rng.random(shape) < 0.6
        pred = np.where(keep & (gt != IGN), gt, pred)
        if i == 1:
            pred[gt == IGN] = k - 1  # class k-1 predicted only where the truth is ignored
            pred[gt == k - 1] = 0
            gt = np.where(gt == k - 1, IGN, gt)
        pairs.append((f"img{i}", pred, gt))
    for ratio in (0.02, 0.08):
        r = evaluate_arrays(pairs, k, boundary_ratio=ratio)
        ai, ap, al, bi, bu, per_image = ref_evaluate(pairs, k, ratio=ratio)
        np.testing.assert_array_equal(r.area_intersect, ai)
        np.testing.assert_array_equal(r.area_pred, ap)
        np.testing.assert_array_equal(r.area_label, al)
        np.testing.assert_array_equal(r.area_union, ap + al - ai)
        np.testing.assert_array_equal(r.boundary_intersect, bi)
        np.testing.assert_array_equal(r.boundary_union, bu)
        # a class with no scored pixel in either map has no bIoU either, whatever its bands
        union = ap + al - ai
        want = [bi[c] / bu[c] if union[c] and bu[c] else np.nan for c in range(k)]
        np.testing.assert_allclose(r.biou, want)
        assert np.isnan(r.iou).tolist() == np.isnan(r.biou).tolist()
        assert [i for i, _ in r.per_image] == [i for i, _ in per_image]
        np.testing.assert_allclose([m for _, m in r.per_image], [m for _, m in per_image])


def test_update_input_errors():
    acc = ConfusionAccumulator(3)
    with pytest.raises(DataError, match="img-7"):
        acc.update(np.zeros((4, 5), int), np.zeros((5, 4), int), image_id="img-7")
    with pytest.raises(DataError, match="img-8.*outside"):
        acc.update(np.zeros((2, 2), int), np.array([[0, 3], [1, 2]]), image_id="img-8")
    with pytest.raises(DataError, match="2-D"):
        acc.update(np.zeros((2, 2, 3), int), np.zeros((2, 2, 3), int), image_id="c")
    with pytest.raises(DataError, match="non-integer"):
        acc.update(np.full((2, 2), 0.5), np.zeros((2, 2), int), image_id="d")
    # integral floats and other integer dtypes are fine
    acc.update(np.ones((2, 2), np.float32), np.ones((2, 2), np.uint8), image_id="ok")
    assert acc.result().area_intersect.tolist() == [0, 4, 0]
    with pytest.raises(ValueError):
        ConfusionAccumulator(3, ignore_index=-1)  # a class id is allowed (the ignored class); negative is not


# --------------------------------------------------------------------------------------------
# evaluate_dirs
# --------------------------------------------------------------------------------------------


def _save(path, arr):
    if path.suffix == ".npy":
        np.save(path, arr)
    else:
        Image.fromarray(arr.astype(np.uint8)).save(path)


def _make_dirs(tmp_path, pairs, pred_ext=".png", gt_ext=".png"):
    pd_, gd = tmp_path / "pred", tmp_path / "gt"
    pd_.mkdir(exist_ok=True)
    gd.mkdir(exist_ok=True)
    for stem, pred, gt in pairs:
        _save(pd_ / f"{stem}{pred_ext}", pred)
        _save(gd / f"{stem}{gt_ext}", gt)
    return pd_, gd


def _random_pairs(seed=5, k=5):
    rng = np.random.default_rng(seed)
    out = []
    for stem, shape in [("b", (12, 20)), ("a", (16, 16)), ("c", (9, 31))]:
        gt = structured_labels(rng, *shape, k, ignore_frac=0.05)
        pred = np.where(rng.random(shape) < 0.7, np.where(gt == IGN, 0, gt), rng.integers(0, k, shape))
        out.append((stem, pred, gt))
    return out


@pytest.mark.parametrize("pred_ext,gt_ext", [(".png", ".png"), (".npy", ".png"), (".npy", ".npy")])
def test_evaluate_dirs_matches_arrays(tmp_path, pred_ext, gt_ext):
    pairs = _random_pairs()
    pdir, gdir = _make_dirs(tmp_path, pairs, pred_ext, gt_ext)
    (pdir / "notes.txt").write_text("ignored")
    calls = []
    r = evaluate_dirs(pdir, gdir, 5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [i for i, _ in r.per_image] == ["a", "b", "c"]  # sorted stem order
    ai, ap, al, bi, bu, _ = ref_evaluate(sorted(pairs, key=lambda t: t[0]), 5)
    np.testing.assert_array_equal(r.area_intersect, ai)
    np.testing.assert_array_equal(r.area_label, al)
    np.testing.assert_array_equal(r.boundary_intersect, bi)
    np.testing.assert_array_equal(r.boundary_union, bu)


def test_evaluate_dirs_palette_png(tmp_path):
    gt = np.array([[0, 1], [2, IGN]], np.uint8)
    pdir, gdir = tmp_path / "p", tmp_path / "g"
    pdir.mkdir()
    gdir.mkdir()
    Image.fromarray(gt).save(gdir / "x.png")  # mode L
    im = Image.new("P", (2, 2))
    im.putpalette([i % 256 for i in range(768)])
    im.putdata([0, 1, 2, 2])
    im.save(pdir / "x.png")  # palette PNG: the indices are the class ids
    r = evaluate_dirs(pdir, gdir, 3)
    np.testing.assert_array_equal(r.area_intersect, [1, 1, 1])


def test_evaluate_dirs_errors(tmp_path):
    pairs = _random_pairs()
    pdir, gdir = _make_dirs(tmp_path, pairs)
    ok = evaluate_dirs(pdir, gdir, 5)
    assert ok.num_images == 3

    # prediction without ground truth
    _save(pdir / "extra.png", pairs[0][1])
    with pytest.raises(DataError, match="extra") as ei:
        evaluate_dirs(pdir, gdir, 5)
    assert str(pdir) in str(ei.value)
    (pdir / "extra.png").unlink()

    # ground truth without prediction
    _save(gdir / "lonely.npy", pairs[0][2])
    with pytest.raises(DataError, match="lonely") as ei:
        evaluate_dirs(pdir, gdir, 5)
    assert str(gdir) in str(ei.value)
    (gdir / "lonely.npy").unlink()

    # duplicate stem
    _save(pdir / "a.npy", pairs[1][1])
    with pytest.raises(DataError, match=r"a\.npy.*a\.png|a\.png.*a\.npy"):
        evaluate_dirs(pdir, gdir, 5)
    (pdir / "a.npy").unlink()

    # corrupt PNG, corrupt npy
    good = (pdir / "b.png").read_bytes()
    (pdir / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="b.png"):
        evaluate_dirs(pdir, gdir, 5)
    (pdir / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="b.png"):
        evaluate_dirs(pdir, gdir, 5)
    (pdir / "b.png").write_bytes(good)
    (gdir / "c.png").unlink()
    (gdir / "c.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="c.npy"):
        evaluate_dirs(pdir, gdir, 5)
    _save(gdir / "c.npy", pairs[2][2])

    # RGB PNG is not a class-id map
    Image.fromarray(np.zeros((9, 31, 3), np.uint8)).save(pdir / "c.png")
    with pytest.raises(DataError, match="c.png"):
        evaluate_dirs(pdir, gdir, 5)

    # size mismatch names both files
    _save(pdir / "c.png", np.zeros((9, 30), np.uint8))
    with pytest.raises(DataError) as ei:
        evaluate_dirs(pdir, gdir, 5)
    assert str(pdir / "c.png") in str(ei.value) and str(gdir / "c.npy") in str(ei.value)

    # out-of-range GT value names the file
    _save(pdir / "c.png", pairs[2][1])
    bad = pairs[2][2].copy()
    bad[0, 0] = 9
    _save(gdir / "c.npy", bad)
    with pytest.raises(DataError, match="c.npy"):
        evaluate_dirs(pdir, gdir, 5)

    # empty and missing folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="empty"):
        evaluate_dirs(empty, gdir, 5)
    with pytest.raises(DataError, match="nope"):
        evaluate_dirs(pdir, tmp_path / "nope", 5)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def test_report_frame_layout_and_parquet_roundtrip(tmp_path):
    gt = np.array([[0, 0, 1], [0, IGN, 1]])
    pred = np.array([[0, 1, 1], [0, 0, 3]])
    r = evaluate_arrays([("a", pred, gt), ("b", gt.clip(0, 3), gt)], num_classes=4)
    df = report_frame(r)
    assert list(df.columns) == REPORT_COLUMNS
    assert df["scope"].tolist() == ["class"] * 4 + ["image"] * 2 + ["summary"]
    assert str(df["class_id"].dtype) == "Int64"
    for col in ["area_intersect", "area_union", "area_pred", "area_label", "boundary_intersect", "boundary_union"]:
        assert str(df[col].dtype) == "Int64", col
        assert df[col].isna().tolist() == [False] * 4 + [True] * 3
    for col in ["iou", "biou", "acc", "miou", "mbiou", "aacc", "macc"]:
        assert df[col].dtype == np.float64, col
    for col in ["scope", "class_name", "image_id"]:
        assert pd.api.types.is_string_dtype(df[col]) or df[col].dtype == object, col
    assert df["class_id"].tolist()[:4] == [0, 1, 2, 3] and df["class_id"][4:].isna().all()
    assert df["class_name"].tolist()[:4] == ["class_0", "class_1", "class_2", "class_3"]
    assert df["class_name"][4:].isna().all()
    assert df["image_id"][:4].isna().all() and df["image_id"][4:6].tolist() == ["a", "b"]
    assert df["image_id"][6:].isna().all()
    assert df["iou"][:4].tolist()[:2] == pytest.approx([r.iou[0], r.iou[1]])
    assert df["iou"][4:].isna().all()
    assert df["area_intersect"][:4].tolist() == r.area_intersect.tolist()
    assert df["miou"][:4].isna().all()
    assert df["miou"][4:6].tolist() == pytest.approx([m for _, m in r.per_image])
    summary = df.iloc[-1]
    for key in ("miou", "mbiou", "aacc", "macc"):
        assert summary[key] == pytest.approx(r.summary[key])
    assert df["mbiou"][:-1].isna().all()

    named = report_frame(r, ["sky", "road", "car", "tree"])
    assert named["class_name"][:4].tolist() == ["sky", "road", "car", "tree"]
    with pytest.raises(ValueError):
        report_frame(r, ["sky"])

    out = tmp_path / "sub" / "report.parquet"
    write_report(named, out)
    assert [p.name for p in out.parent.iterdir()] == ["report.parquet"]  # no temp file left
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, named)


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------


def test_load_class_names(tmp_path):
    p = tmp_path / "classes.yaml"
    p.write_text("- sky\n- road\n- car\n")
    assert load_class_names(p) == ["sky", "road", "car"]
    p.write_text("classes: [sky, road]\n")
    assert load_class_names(p, num_classes=2) == ["sky", "road"]
    p.write_text("1: road\n0: sky\n2: car\n")
    assert load_class_names(p) == ["sky", "road", "car"]
    p.write_text("classes:\n  0: sky\n  1: road\n")
    assert load_class_names(p) == ["sky", "road"]
    for bad in ["0: sky\n2: car\n", "just a string\n", "[sky, [nested]]\n", "[a, : b\n", "[]\n"]:
        p.write_text(bad)
        with pytest.raises(DataError, match="classes.yaml"):
            load_class_names(p)
    p.write_text("[sky, road]\n")
    with pytest.raises(DataError, match="classes.yaml"):
        load_class_names(p, num_classes=3)
    with pytest.raises(DataError, match="missing.yaml"):
        load_class_names(tmp_path / "missing.yaml")
