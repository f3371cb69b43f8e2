"""From a model that maps ``S x S`` windows to per-pixel maps, to those maps at each image's own
size: every caller's path from images of any size to class probabilities.

:func:`image_maps` cuts each image into its model inputs (:func:`ddps_core.geometry.tiling`,
``whole`` or ``slide``), runs the model on the inputs of several images at once (``batch``
windows per call, so small images share a forward), and merges each image's windows back
(:meth:`~ddps_core.geometry.Tiling.merge`: the mean where windows overlap, bilinear to the
image's size).

Test-time augmentation, as mmsegmentation's ``aug_test``: ``flip`` adds the horizontally
flipped image (its maps flipped back), ``scales`` slides over the image scaled to a short side
of ``scale * S`` instead of ``S`` (:func:`ddps_core.geometry.tiling`; padded where it is
smaller than a window), its maps resized back to the image's size; the maps of every
(scale, flip) pair are averaged. In ``whole`` mode a scale changes nothing (the image is
resized to ``S x S`` anyway), so only ``slide`` makes use of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from ddps_core.geometry import Tiling, tiling

__all__ = ["WindowFn", "augmentations", "image_groups", "image_maps", "labels_of"]

#: ``uint8 [n, S, S, 3]`` windows -> float ``[n, C, S, S]`` maps (on the CPU).
WindowFn = Callable[[np.ndarray], torch.Tensor]


def augmentations(flip: bool = False, scales: Sequence[float] | None = None) -> list[tuple[float, bool]]:
    """The (scale, flip) pairs of a test-time augmentation; ``[(1.0, False)]`` without one."""
    ratios = [1.0] if not scales else [float(s) for s in scales]
    if any(not s > 0 for s in ratios):
        raise ValueError(f"test-time scales must be positive, got {list(ratios)}")
    return [(s, f) for s in ratios for f in ((False, True) if flip else (False,))]


def image_groups(shapes: Sequence[Sequence[int]], size: int, mode: str = "whole", stride: int | None = None,
                 windows: int = 16, flip: bool = False, scales: Sequence[float] | None = None) -> list[list[int]]:
    """Indices of images (of ``shapes`` ``(H, W)``), in order, cut into consecutive groups of at
    most ``windows`` model inputs each (every test-time view counted); an image with more is a
    group of its own. Give each group to :func:`image_maps` to bound the maps held at once
    (they are all kept until its images are merged). A function of the shapes and the settings
    only: batches cut this way, and the random draws made per batch, are the same on any
    machine."""
    views = augmentations(flip, scales if mode == "slide" else None)  # whole: every scale is S x S
    groups: list[list[int]] = []
    current: list[int] = []
    held = 0
    for k, shape in enumerate(shapes):
        n = sum(len(tiling(shape, size, mode, stride, s)) for s, _ in views)
        if current and held + n > windows:
            groups.append(current)
            current, held = [], 0
        current.append(k)
        held += n
    if current:
        groups.append(current)
    return groups


def image_maps(images: Sequence[np.ndarray], window_fn: WindowFn, size: int, mode: str = "whole",
               stride: int | None = None, batch: int = 16, flip: bool = False,
               scales: Sequence[float] | None = None) -> Iterator[torch.Tensor]:
    """float ``[C, H, W]`` of each of ``images`` (uint8 ``H x W x 3``, any sizes), in order.

    :param window_fn: the model on a batch of windows (see :data:`WindowFn`); its ``C`` maps
        are merged channel by channel, so it may return probabilities and an uncertainty side by
        side.
    :param batch: windows per ``window_fn`` call, across images.
    """
    views = augmentations(flip, scales if mode == "slide" else None)  # whole: every scale is S x S
    jobs: list[tuple[int, Tiling, bool]] = []
    crops: list[np.ndarray] = []
    for k, image in enumerate(images):
        for scale, flipped in views:
            view = np.ascontiguousarray(image[:, ::-1]) if flipped else image
            t = tiling(view.shape[:2], size, mode, stride, scale)
            jobs.append((k, t, flipped))
            crops.append(t.crops(view))
    windows = np.concatenate(crops) if crops else np.empty((0, size, size, 3), np.uint8)
    outs = [window_fn(windows[a:a + batch]).float().cpu() for a in range(0, len(windows), max(1, int(batch)))]
    maps = torch.cat(outs) if outs else torch.empty(0)
    at, per_image = 0, len(views)
    for k, image in enumerate(images):
        H, W = image.shape[:2]
        total = None
        for _, t, flipped in jobs[k * per_image:(k + 1) * per_image]:
            m = t.merge(maps[at:at + len(t)])  # at the image's size
            at += len(t)
            if flipped:
                m = m.flip(-1)
            total = m if total is None else total + m
        yield total / per_image


def labels_of(probs: torch.Tensor, num_classes: int) -> np.ndarray:
    """``H x W`` argmax of ``[C >= K, H, W]`` (the first ``num_classes`` channels), uint8 for up
    to 256 classes, else uint16. Ties go to the smallest class id."""
    labels = probs[:num_classes].argmax(0).numpy()
    return labels.astype(np.uint8 if num_classes <= 256 else np.uint16)
