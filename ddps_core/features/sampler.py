"""Shuffled pixel batches for training the pixel classifiers, streamed from a feature store.

:class:`PixelSampler` yields ``(features float32 [B, D], labels int64 [B])`` for one epoch per
iteration. It walks the images in a seeded random order, ``buffer_images`` at a time: for each
group it reads the native maps and labels, lists the group's valid pixels, shuffles them, and
computes their upsampled features on demand (4-tap bilinear blends, in blocks of a few MB)
to cut batches. Memory is bounded by one group (native maps plus pixel coordinates) and one
block of features, independent of the number of images.

Valid pixels follow the reference rule: the label is not ``ignore_index``, and its
class has at least ``min_class_pixels`` pixels in that image (rarer classes are treated as
ignore in that image).

Shuffle (a choice, differing from the reference): the reference holds every training pixel's
upsampled features in RAM (~2.2 GB per 256x256 image) and shuffles globally. Here the shuffle
is buffer-local: images are shuffled, and pixels are shuffled within each group of
``buffer_images`` images, so a batch mixes pixels of at most two consecutive groups' images
rather than of the whole set. This is what keeps memory independent of the dataset size; a
larger ``buffer_images`` brings it closer to a global shuffle. Each epoch uses a new
permutation derived from ``(seed, epoch)``; every valid pixel appears exactly once per epoch,
and only the last batch of an epoch may be smaller than ``batch_size`` (a group's leftover
pixels are carried into the next group's first batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ddps_core.errors import ConfigError, DataError

from .store import FeatureStore

__all__ = ["PixelSampler", "valid_pixel_mask"]

BLOCK_BYTES = 16 * 2**20  # features computed at once (float32), before cutting batches


def valid_pixel_mask(label: np.ndarray, ignore_index: int | None = 255, min_class_pixels: int = 20) -> np.ndarray:
    """Boolean mask of training pixels: not ``ignore_index`` and of a class with at least
    ``min_class_pixels`` pixels in this label map."""
    lab = np.asarray(label).astype(np.int64, copy=False)
    valid = np.ones(lab.shape, dtype=bool) if ignore_index is None else lab != ignore_index
    if min_class_pixels > 1 and valid.any():
        classes, counts = np.unique(lab[valid], return_counts=True)
        rare = classes[counts < min_class_pixels]
        if rare.size:
            valid &= ~np.isin(lab, rare)
    return valid


class PixelSampler:
    """Iterable of shuffled ``(features [B, D] float32, labels [B] int64)`` batches.

    :param store: a feature store with labels.
    :param batch_size: pixels per batch.
    :param buffer_images: images whose pixels are shuffled together (memory bound).
    :param seed: base seed; epoch ``e`` uses ``np.random.default_rng([seed, e])``.
    :param ignore_index: label value never used for training (None: none).
    :param min_class_pixels: classes with fewer pixels in an image count as ignore there.
    :param image_indices: store indices to use (default: all images of the store).
    """

    def __init__(
        self,
        store: FeatureStore,
        batch_size: int = 64,
        buffer_images: int = 8,
        seed: int = 0,
        ignore_index: int | None = 255,
        min_class_pixels: int = 20,
        image_indices: Sequence[int] | None = None,
    ):
        if not store.has_labels:
            raise DataError(f"{store.path}: feature store has no labels; cannot sample training pixels")
        check = getattr(store, "raise_if_damaged", None)
        if check is not None:  # a feature store: a missing or truncated shard is named now
            check()
        if batch_size < 1 or buffer_images < 1:
            raise ConfigError(f"batch_size and buffer_images must be >= 1, got {batch_size}, {buffer_images}")
        self.store = store
        self.batch_size = int(batch_size)
        self.buffer_images = int(buffer_images)
        self.seed = int(seed)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.min_class_pixels = int(min_class_pixels)
        idx = np.arange(len(store)) if image_indices is None else np.asarray(list(image_indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(store)):
            raise ConfigError(f"{store.path}: image_indices must lie in 0..{len(store) - 1}")
        if len(np.unique(idx)) != idx.size:
            raise ConfigError(f"{store.path}: image_indices contain duplicates")
        self.image_indices = idx
        self.epoch = 0
        rows = BLOCK_BYTES // (4 * max(store.feature_dim, 1))
        self.block_rows = max(self.batch_size, rows // self.batch_size * self.batch_size)
        self.peak_buffered_pixels = 0  # most pixel coordinates held at once
        self.peak_feature_rows = 0  # most feature rows held at once (block + carry)
        self._num_pixels: int | None = None

    # -- sizes ----------------------------------------------------------------------------------

    def valid_mask(self, i: int) -> np.ndarray:
        return valid_pixel_mask(self.store.label(int(i)), self.ignore_index, self.min_class_pixels)

    def num_pixels(self) -> int:
        """Valid pixels per epoch (reads every label once)."""
        if self._num_pixels is None:
            self._num_pixels = int(sum(int(self.valid_mask(i).sum()) for i in self.image_indices))
        return self._num_pixels

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(self.num_pixels() / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration produces (iterating advances it by one)."""
        self.epoch = int(epoch)

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._epoch(epoch)

    def _epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.image_indices)
        store, B, D = self.store, self.batch_size, self.store.feature_dim
        carry_x = np.empty((0, D), dtype=np.float32)
        carry_y = np.empty((0,), dtype=np.int64)
        for g in range(0, len(order), self.buffer_images):
            group = [int(i) for i in order[g : g + self.buffer_images]]
            natives, slots, ys, xs, labs = [], [], [], [], []
            for j, i in enumerate(group):
                label = store.label(i)
                yy, xx = np.nonzero(valid_pixel_mask(label, self.ignore_index, self.min_class_pixels))
                if yy.size == 0:
                    natives.append(None)
                    continue
                natives.append(store.native(i))
                slots.append(np.full(yy.size, j, dtype=np.int64))
                ys.append(yy)
                xs.append(xx)
                labs.append(label[yy, xx].astype(np.int64))
            if not slots:
                continue
            slot, y, x, lab = (np.concatenate(a) for a in (slots, ys, xs, labs))
            perm = rng.permutation(slot.size)
            slot, y, x, lab = slot[perm], y[perm], x[perm], lab[perm]
            self.peak_buffered_pixels = max(self.peak_buffered_pixels, slot.size + carry_y.size)
            for s in range(0, slot.size, self.block_rows):
                sl = slice(s, s + self.block_rows)
                feats = np.empty((len(slot[sl]), D), dtype=np.float32)
                for j, native in enumerate(natives):
                    rows = np.nonzero(slot[sl] == j)[0]
                    if rows.size:
                        feats[rows] = store.pixels(group[j], y[sl][rows], x[sl][rows], native=native)
                if carry_y.size:
                    feats = np.concatenate([carry_x, feats])
                    labels = np.concatenate([carry_y, lab[sl]])
                else:
                    labels = lab[sl]
                self.peak_feature_rows = max(self.peak_feature_rows, len(labels))
                full = len(labels) // B * B
                for b in range(0, full, B):
                    yield torch.from_numpy(feats[b : b + B]), torch.from_numpy(labels[b : b + B])
                carry_x, carry_y = feats[full:].copy(), labels[full:].copy()
        if carry_y.size:
            yield torch.from_numpy(carry_x), torch.from_numpy(carry_y)
