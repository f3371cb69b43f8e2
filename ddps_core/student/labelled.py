"""``student.source: labelled``: random crops of a labelled split at its own resolution, the
training pipeline of mmsegmentation's configs (the supervised setting of DDPS):

1. **Resize** (``Resize(img_scale=base_scale, ratio_range=ratio_range)``): a ratio ``r`` is drawn
   uniformly from ``ratio_range``; the image is rescaled, keeping its aspect ratio, by the
   largest factor that keeps its long edge within ``r * base_scale[0]`` and its short edge
   within ``r * base_scale[1]`` (mmcv's ``imrescale``: ``f = min(L / long, S / short)``, new size
   ``int(w * f + 0.5) x int(h * f + 0.5)``, with ``L = int(base_scale[0] * r)`` and
   ``S = int(base_scale[1] * r)``). With ``base_scale`` None, ``f = r``. The image is resized
   bilinearly (PIL, antialiased when shrinking), the label by nearest neighbour as OpenCV samples
   (source pixel ``floor(x * in / out)``).
2. **RandomCrop** (``crop_size``, ``cat_max_ratio``): a ``crop_h x crop_w`` window (smaller where
   the image is) at a uniformly drawn offset; with ``cat_max_ratio``, while one class covers
   ``cat_max_ratio`` or more of the window's labelled pixels (or there is only one class), the
   window is drawn again, at most 10 times, and the last draw is kept.
3. **RandomFlip**: horizontal, with probability 1/2 (``hflip``).
4. **Pad** to ``crop_size`` at the bottom and right: image 0, label the ignore index.

mmsegmentation's ``PhotoMetricDistortion`` (random brightness, contrast, saturation and hue)
is not applied; docs/method.md lists this among the differences.

Every draw comes from a NumPy generator the caller seeds (per epoch), so a resumed run draws
the crops of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddps_core.datasets.common import nearest_like_reference
from ddps_core.errors import DataError

__all__ = ["LabelledCrops", "random_crop_box", "rescale_size"]


def rescale_size(h: int, w: int, ratio: float, base_scale: Sequence[int] | None) -> tuple[int, int]:
    """``(new_h, new_w)`` of an ``h x w`` image under ratio ``ratio`` (see the module text)."""
    if base_scale is None:
        f = float(ratio)
    else:
        long_edge, short_edge = int(max(base_scale) * ratio), int(min(base_scale) * ratio)
        f = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def random_crop_box(label: np.ndarray, crop: Sequence[int], rng: np.random.Generator, ignore_index: int,
                    cat_max_ratio: float | None) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a random crop of ``label``'s image (see the module text)."""
    h, w = label.shape
    ch, cw = int(crop[0]), int(crop[1])

    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, min(y + ch, h), x, min(x + cw, w)

    box = draw()
    if cat_max_ratio is not None and cat_max_ratio < 1:
        for _ in range(10):
            y0, y1, x0, x1 = box
            values, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


class LabelledCrops:
    """A labelled reader's images as random training crops (see the module text).

    ``len`` and ``ids`` are the reader's images; :meth:`batch` gives one random crop of each
    image asked for. ``size``: the side the rest of the S x S pipeline predicts at (recorded).
    """

    def __init__(self, reader: Any, crop_size: Sequence[int], *, base_scale: Sequence[int] | None,
                 ratio_range: Sequence[float], cat_max_ratio: float | None, hflip: bool, ignore_index: int,
                 size: int | None = None):
        self.reader = reader
        self.ids = [str(i) for i in reader.ids]
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.base_scale = None if base_scale is None else (int(base_scale[0]), int(base_scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = cat_max_ratio
        self.hflip, self.ignore_index = bool(hflip), int(ignore_index)
        self.size = size

    def __len__(self) -> int:
        return len(self.ids)

    def crop_pair(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One random training crop of image ``i``: ``(uint8 [h, w, 3], label [h, w])`` of
        ``crop_size``."""
        sample = self.reader[int(i)]
        if sample.label is None:
            raise DataError(f"{getattr(self.reader, 'folder', self.reader)}: image {sample.id!r} has no label")
        image, label = np.asarray(sample.image), np.asarray(sample.label)
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * float(rng.random())
        nh, nw = rescale_size(image.shape[0], image.shape[1], ratio, self.base_scale)
        if (nh, nw) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image, "RGB").resize((nw, nh), Image.Resampling.BILINEAR), np.uint8)
            label = nearest_like_reference(label, nh, nw)
        y0, y1, x0, x1 = random_crop_box(label, self.crop, rng, self.ignore_index, self.cat_max_ratio)
        image, label = image[y0:y1, x0:x1], label[y0:y1, x0:x1]
        if self.hflip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        ch, cw = self.crop
        out_i = np.zeros((ch, cw, 3), np.uint8)
        out_l = np.full((ch, cw), self.ignore_index, np.int64)
        out_i[: image.shape[0], : image.shape[1]] = image
        out_l[: label.shape[0], : label.shape[1]] = label
        return out_i, out_l

    def batch(self, indices: Sequence[int], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """float ``[B, 3, crop_h, crop_w]`` in [0, 1] and long labels ``[B, crop_h, crop_w]``."""
        pairs = [self.crop_pair(int(i), rng) for i in indices]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return images, labels

    def content_id(self) -> str:
        """The reader's content (the crops are drawn from the run's seed)."""
        return self.reader.content_id()
