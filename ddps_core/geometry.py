"""How an image of any size meets a model that works on ``S x S`` inputs, and how the model's
class probabilities go back to the image's own size. Two modes, named as mmsegmentation
names them:

``whole``
    The image is resized to ``S x S`` (its aspect ratio is not kept), the model sees that one
    input, and its probabilities are resized back to the image's ``H x W`` (bilinear), then
    the caller takes the argmax. Every pixel gets a prediction; thin structures of a very
    long image are squeezed.

``slide``
    The image is scaled so that its short side is ``S`` (aspect ratio kept), then cut into
    ``S x S`` windows at ``stride`` pixels (the last window of a row or column is moved back
    to end at the border, so windows may overlap more there). The probabilities of the windows
    are averaged where they overlap, and the scaled canvas is resized back to ``H x W``.
    Object scale stays the same for every aspect ratio; a ``2:1`` image is three windows at
    the default stride.

Training follows the same rule: ``whole`` trains on the resized image, ``slide`` on the
windows (each window a training image). Labels are resampled nearest-neighbour on the same
pixel grid, so only values present in the label appear.

Images are resized with PIL's bilinear filter (antialiased when shrinking); probabilities with
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddps_core.errors import ConfigError

__all__ = ["MODES", "Tiling", "default_stride", "resize_image", "resize_label", "tiling", "windows_per_image"]

MODES = ("whole", "slide")


def default_stride(size: int) -> int:
    """Two thirds of the window, as mmsegmentation's sliding configurations use (e.g. 341 for
    512 windows): every pixel away from the borders is seen by one or two windows per axis."""
    return max(1, (2 * int(size) + 2) // 3)


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resampling (pixel centres)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``H x W x 3`` to ``height x width x 3`` (PIL bilinear; unchanged when equal)."""
    if image.shape[:2] == (height, width):
        return image
    out = Image.fromarray(np.ascontiguousarray(image), "RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map to ``height x width`` by nearest-neighbour sampling of pixel centres."""
    h, w = label.shape[:2]
    if (h, w) == (height, width):
        return label
    rows, cols = _nearest_index(height, h), _nearest_index(width, w)
    return np.ascontiguousarray(label[rows[:, None], cols[None, :]])


@dataclass(frozen=True)
class Tiling:
    """The model inputs of one image (see the module docstring): the image's ``shape``
    ``(H, W)``, the ``scaled`` canvas ``(h, w)`` the windows are cut from, and the top-left
    ``origins`` of the ``size x size`` windows on that canvas."""

    mode: str
    size: int
    shape: tuple[int, int]
    scaled: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    padded: tuple[int, int] | None = None
    """The canvas the windows are cut from when ``scaled`` is smaller than a window along an
    axis (a test-time scale below 1): ``scaled`` padded with zeros at the bottom and right."""

    def __len__(self) -> int:
        return len(self.origins)

    @property
    def canvas(self) -> tuple[int, int]:
        return self.padded or self.scaled

    def crops(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``[n, S, S, 3]``: the model inputs of ``image`` (``H x W x 3``)."""
        self._check(image.shape[:2], "image")
        canvas = resize_image(image, *self.scaled)
        if self.canvas != self.scaled:
            (h, w), (ph, pw) = self.scaled, self.canvas
            canvas = np.pad(canvas, ((0, ph - h), (0, pw - w), (0, 0)))
        S = self.size
        return np.stack([canvas[y:y + S, x:x + S] for y, x in self.origins])

    def label_crops(self, label: np.ndarray) -> np.ndarray:
        """``[n, S, S]``: ``label`` (``H x W``) on the model inputs' pixels (nearest)."""
        self._check(label.shape[:2], "label")
        if self.canvas != self.scaled:
            raise ValueError("label_crops: a padded tiling (a scale below 1) has no label for its padding")
        canvas = resize_label(label, *self.scaled)
        S = self.size
        return np.stack([canvas[y:y + S, x:x + S] for y, x in self.origins])

    def merge(self, probs: torch.Tensor) -> torch.Tensor:
        """float ``[K, H, W]``: the windows' probabilities ``[n, K, S, S]`` averaged where they
        overlap on the scaled canvas, then resized to the image's size (bilinear)."""
        n, k, S, S2 = probs.shape
        if n != len(self) or S != self.size or S2 != self.size:
            raise ValueError(f"merge: expected [{len(self)}, K, {self.size}, {self.size}], got {list(probs.shape)}")
        if self.mode == "whole":
            canvas = probs[0]
        else:
            (h, w), (ph, pw) = self.scaled, self.canvas
            total = probs.new_zeros(k, ph, pw)
            count = probs.new_zeros(1, ph, pw)
            for (y, x), p in zip(self.origins, probs):
                total[:, y:y + S, x:x + S] += p
                count[:, y:y + S, x:x + S] += 1
            canvas = (total / count)[:, :h, :w]
        if tuple(canvas.shape[1:]) == self.shape:
            return canvas
        return F.interpolate(canvas[None], size=self.shape, mode="bilinear", align_corners=False)[0]

    def _check(self, shape: Sequence[int], what: str) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"{what} is {tuple(shape)}, this tiling is for {self.shape}")


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Window starts along an axis of ``n >= size`` pixels: every ``stride``, the last one
    moved back to end at ``n`` (mmsegmentation's rule)."""
    count = max(n - size + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, n - size) for i in range(count)})


def tiling(shape: Sequence[int], size: int, mode: str = "whole", stride: int | None = None,
           scale: float = 1.0) -> Tiling:
    """The :class:`Tiling` of an image of ``shape`` ``(H, W)`` for ``size x size`` inputs.

    ``scale`` (``slide`` only; a test-time scale) scales the image so that its short side is
    ``round(scale * size)`` instead of ``size``, as mmsegmentation's multi-scale test rescales
    before it slides; a canvas smaller than a window is padded (:attr:`Tiling.padded`). In
    ``whole`` mode the image is resized to ``size x size`` whatever the scale."""
    H, W = int(shape[0]), int(shape[1])
    size = int(size)
    if H < 1 or W < 1:
        raise ValueError(f"image shape must be positive, got {(H, W)}")
    if mode == "whole":
        return Tiling(mode, size, (H, W), (size, size), ((0, 0),))
    if mode != "slide":
        raise ConfigError(f"resize mode {mode!r}: valid modes are {list(MODES)}")
    stride = default_stride(size) if stride is None else int(stride)
    if not 1 <= stride <= size:
        raise ConfigError(f"data.stride: the slide stride must be between 1 and the window size {size}, got {stride}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    short = max(1, round(size * float(scale)))
    h, w = (short, max(short, round(W * short / H))) if H <= W else (max(short, round(H * short / W)), short)
    ph, pw = max(h, size), max(w, size)
    origins = tuple((y, x) for y in _starts(ph, size, stride) for x in _starts(pw, size, stride))
    return Tiling(mode, size, (H, W), (h, w), origins, None if (ph, pw) == (h, w) else (ph, pw))


def windows_per_image(shape: Sequence[int], size: int, mode: str, stride: int | None = None) -> int:
    """How many model inputs an image of ``shape`` makes (1 in ``whole`` mode)."""
    return len(tiling(shape, size, mode, stride))
