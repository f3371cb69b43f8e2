"""Benchmark: mBIoU with the one-dilation-per-map fast path vs the per-class erosion reference.

Data: ``n_images`` seeded ``size x size`` label maps with ``num_classes`` classes, each a
Voronoi partition with many regions (a few regions are ``ignore_index``); predictions are the
ground truth computed from jittered Voronoi seeds (moved boundaries) with random elliptic blobs
of other classes pasted on top.

(a) ours: :class:`ddps_core.metrics.ConfusionAccumulator` over all images (area statistics
    and boundary bands together).
(b) reference (DDPS / mmseg Boundary IoU): for every class present in the ground truth or the
    prediction, a one-hot channel, padded with one ring of zeros and eroded ``d`` times with a
    3x3 kernel (``-max_pool2d(-x, 3, stride=1, padding=1)``; max-pool pads with -inf, so only
    the explicit zero ring erodes from outside), ``band = mask & ~eroded``. All classes of one
    image are stacked as channels of one tensor, so the Python loop is over ``d`` only; the
    work is still K x d erosions per map. Ignore pixels are in no GT channel.
(b') the same erosions done as separable logical ANDs of shifted boolean slices -- a much
    faster CPU implementation of the reference (torch's CPU max_pool2d is slow), so the
    speed-up is not only an artefact of a slow baseline.

The two must give identical boundary intersection / union arrays (asserted).

Run: ``python -m benchmarks.bench_mbiou`` (or ``python benchmarks/bench_mbiou.py``).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.metrics import ConfusionAccumulator, boundary_width  # noqa: E402

IGNORE = 255


def _voronoi(points: np.ndarray, labels: np.ndarray, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    grid = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    _, idx = cKDTree(points).query(grid)
    return labels[idx].reshape(size, size)


def make_dataset(
    n_images: int = 20, size: int = 512, num_classes: int = 150, seed: int = 0
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Seeded ``(image_id, pred, gt)`` triples of structured random label maps."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n_images):
        n_regions = int(rng.integers(300, 600))
        pts = rng.random((n_regions, 2)) * size
        labels = rng.integers(0, num_classes, n_regions)
        labels[rng.random(n_regions) < 0.03] = IGNORE  # a few ignored regions
        gt = _voronoi(pts, labels, size)
        # prediction: boundaries moved (jittered seeds), ignored regions get some class
        pred_labels = np.where(labels == IGNORE, rng.integers(0, num_classes, n_regions), labels)
        pred = _voronoi(pts + rng.normal(0, 3.0, pts.shape), pred_labels, size)
        for _ in range(int(rng.integers(20, 40))):  # wrong blobs
            cy, cx = rng.random(2) * size
            ry, rx = rng.uniform(4, 40, 2)
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            pred[blob] = rng.integers(0, num_classes)
        out.append((f"img{i:03d}", pred.astype(np.int64), gt.astype(np.int64)))
    return out


def ours(pairs, num_classes: int, ratio: float = 0.02):
    acc = ConfusionAccumulator(num_classes, ignore_index=IGNORE, boundary_ratio=ratio)
    for image_id, pred, gt in pairs:
        acc.update(pred, gt, image_id)
    r = acc.result()
    return r.boundary_intersect, r.boundary_union


def _erode_maxpool(x: torch.Tensor, d: int) -> torch.Tensor:
    """d 3x3 erosions of a (1, C, H, W) float 0/1 tensor via -max_pool2d(-x)."""
    x = x.contiguous(memory_format=torch.channels_last)  # same op, ~2x faster on CPU
    for _ in range(d):
        x = -torch.nn.functional.max_pool2d(-x, kernel_size=3, stride=1, padding=1)
    return x > 0.5


def _erode_bool(x: torch.Tensor, d: int) -> torch.Tensor:
    """d 3x3 erosions of a (1, C, H, W) tensor as separable logical ANDs of shifted bool
    slices (pixels beyond the frame never erode, as with max-pool's -inf padding)."""
    m = x > 0.5
    for _ in range(d):
        r = m.clone()
        r[..., 1:] &= m[..., :-1]
        r[..., :-1] &= m[..., 1:]
        m = r.clone()
        m[..., 1:, :] &= r[..., :-1, :]
        m[..., :-1, :] &= r[..., 1:, :]
    return m


REFERENCE_METHODS = {"maxpool": _erode_maxpool, "bool": _erode_bool}


def _bands_reference(label: np.ndarray, classes: np.ndarray, d: int, method: str) -> torch.Tensor:
    """(C, H, W) bool bands of ``label == c`` for each c in ``classes``, by d erosions."""
    lab = torch.from_numpy(label)
    masks = lab[None] == torch.from_numpy(classes)[:, None, None]
    x = torch.nn.functional.pad(masks.float(), (1, 1, 1, 1), value=0.0)[None]  # 1 x C x H+2 x W+2
    eroded = REFERENCE_METHODS[method](x, d)[0, :, 1:-1, 1:-1]
    return masks & ~eroded


def reference(pairs, num_classes: int, ratio: float = 0.02, method: str = "maxpool"):
    bi = np.zeros(num_classes, np.int64)
    bu = np.zeros(num_classes, np.int64)
    for _, pred, gt in pairs:
        d = boundary_width(gt.shape[0], gt.shape[1], ratio)
        present = np.union1d(np.unique(gt), np.unique(pred))
        classes = present[(present >= 0) & (present < num_classes)]
        gb = _bands_reference(gt, classes, d, method)  # ignore pixels match no class channel
        pb = _bands_reference(pred, classes, d, method)
        bi[classes] += (gb & pb).sum(dim=(1, 2)).numpy()
        bu[classes] += (gb | pb).sum(dim=(1, 2)).numpy()
    return bi, bu


def _time(fn, repeats: int, warmup=None, slow_s: float = 60.0):
    """Median of up to ``repeats`` timed calls after one warm-up call. If one timed call takes
    longer than ``slow_s``, stop early (at least one call is always timed)."""
    (warmup or fn)()
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > slow_s:
            break
    return statistics.median(times), times, out


def run(
    repeats: int = 5,
    n_images: int = 20,
    size: int = 512,
    num_classes: int = 150,
    references: tuple[str, ...] = ("maxpool", "bool"),
    slow_s: float = 60.0,
) -> dict:
    """Time our mBIoU and the reference erosion method(s); check the arrays are identical.

    Each timing is the median of ``repeats`` runs after one warm-up (the reference warms up on
    the first image only). A reference whose single run exceeds 60 s is timed with fewer
    repeats (at least 1); ``<name>_repeats`` in the result says how many. ``reference_s`` /
    ``ratio`` refer to the first entry of ``references`` (``"maxpool"``, the briefed
    max_pool2d erosion); ``"bool"`` is a faster separable boolean erosion, for a fairer
    comparison.
    """
    pairs = make_dataset(n_images, size, num_classes)
    ours_s, ours_all, (obi, obu) = _time(lambda: ours(pairs, num_classes), repeats)
    res: dict = {
        "n_images": n_images,
        "size": size,
        "num_classes": num_classes,
        "d": boundary_width(size, size),
        "mean_classes_per_image": float(
            np.mean([np.union1d(np.unique(g[g != IGNORE]), np.unique(p)).size for _, p, g in pairs])
        ),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "ours_s": ours_s,
        "ours_times": ours_all,
    }
    for i, method in enumerate(references):
        ref_s, ref_all, (rbi, rbu) = _time(
            lambda m=method: reference(pairs, num_classes, method=m),
            repeats,
            warmup=lambda m=method: reference(pairs[:1], num_classes, method=m),
            slow_s=slow_s,
        )
        np.testing.assert_array_equal(obi, rbi, err_msg=f"{method}: boundary intersection differs")
        np.testing.assert_array_equal(obu, rbu, err_msg=f"{method}: boundary union differs")
        res[f"{method}_s"] = ref_s
        res[f"{method}_times"] = ref_all
        res[f"{method}_repeats"] = len(ref_all)
        res[f"{method}_ratio"] = ref_s / ours_s
        if i == 0:
            res["reference"] = method
            res["reference_s"] = ref_s
            res["reference_repeats"] = len(ref_all)
            res["ratio"] = ref_s / ours_s
    res["identical"] = True
    return res


def main() -> None:
    res = run()
    print(
        f"mBIoU over {res['n_images']} images {res['size']}x{res['size']}, K={res['num_classes']}, "
        f"d={res['d']}, ~{res['mean_classes_per_image']:.0f} classes present per image, "
        f"torch threads={res['torch_threads']}"
    )
    print(f"ours (one dilation per map):        {res['ours_s']:8.3f} s  (median of {res['repeats']})")
    labels = {"maxpool": "reference, max_pool2d K x d:", "bool": "reference, bool-AND K x d:"}
    for method in REFERENCE_METHODS:
        if f"{method}_s" not in res:
            continue
        n = res[f"{method}_repeats"]
        note = "" if n == res["repeats"] else "  [fewer repeats: one run took > 60 s]"
        print(
            f"{labels[method]:<35} {res[f'{method}_s']:8.3f} s  (median of {n}), "
            f"{res[f'{method}_ratio']:.1f}x slower than ours{note}"
        )
    print(f"ratio (reference / ours), {res['reference']}: {res['ratio']:.1f}x")
    print("boundary intersection / union arrays identical for every method: yes")


if __name__ == "__main__":
    main()
