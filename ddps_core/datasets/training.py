"""What a model trains on when its images have any size: the ``S x S`` entries of a labelled
split under ``data.resize``, by the rule prediction follows (:mod:`ddps_core.geometry`).

``whole``
    one entry per image: the image resized to ``S x S`` (aspect ratio not kept), its label
    resized nearest on the same grid. The entry keeps the image's id.
``slide``
    one entry per window: the image scaled to short side ``S`` and cut into ``S x S`` windows
    at ``data.stride`` (:func:`ddps_core.geometry.tiling`), the label cut the same way. The
    entry of the window whose top-left corner is ``(y, x)`` on the scaled image is
    ``<image id>@<y>_<x>``.

:class:`TrainingView` wraps a reader (:class:`~ddps_core.datasets.common.BaseReader`) and reads
like one (``len``, ``[i]`` -> :class:`Sample`, ``ids``, ``num_classes``, ``ignore_index``,
``class_names``, ``content_id()``), so the teacher's feature store, the ``rgbxy`` baseline, the
student and the refiner take it where they took the reader. The teacher's training store, the
student's training and selection data and the refiner's training data go through it; the
diffusion model's own training images do not (they are centre-cropped, as guided-diffusion
does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddps_core.datasets.common import _DECODE_ERRORS, Sample
from ddps_core.errors import ConfigError, DataError

__all__ = ["WINDOW_MARK", "TrainingView", "entries_of_first_images", "image_id_of", "window_id"]

#: Separates an image's id from its window's origin in a ``slide`` entry's id.
WINDOW_MARK = "@"


def window_id(image_id: str, y: int, x: int) -> str:
    """The id of the ``slide`` window at ``(y, x)`` of image ``image_id``: ``<id>@<y>_<x>``."""
    return f"{image_id}{WINDOW_MARK}{int(y)}_{int(x)}"


def image_id_of(entry_id: str) -> str:
    """The image id of a training entry (a window's image, or the entry itself)."""
    head, mark, tail = str(entry_id).rpartition(WINDOW_MARK)
    if mark and tail.replace("_", "", 1).isdigit() and tail.count("_") == 1:
        return head
    return str(entry_id)


def entries_of_first_images(entry_ids: Sequence[str], n: int | None) -> list[int]:
    """Indices of the entries that belong to the first ``n`` images (all with ``None``), in
    order: ``teacher.n_train`` counts images, whatever the windows per image."""
    if n is None:
        return list(range(len(entry_ids)))
    seen: list[str] = []
    out = []
    for i, eid in enumerate(entry_ids):
        image = image_id_of(eid)
        if image not in seen:
            if len(seen) == n:
                continue
            seen.append(image)
        if image in seen:
            out.append(i)
    return out


def _image_shape(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header (the pixels are not decoded)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot read image (corrupt or not an image): {exc}") from None
    return int(h), int(w)


class TrainingView:
    """The training entries of ``reader`` at ``size`` under ``mode`` (see the module text).

    :param reader: a labelled split's reader (or any sequence of :class:`Sample` with ``ids``).
    :param size: ``S``, the side of every entry.
    :param mode: ``whole`` or ``slide`` (``data.resize``).
    :param stride: ``slide``: the window stride (``data.stride``; None: two thirds of ``S``).
    """

    def __init__(self, reader: Any, size: int, mode: str = "whole", stride: int | None = None):
        from ddps_core.geometry import MODES, default_stride, tiling

        self.reader, self.size, self.mode = reader, int(size), str(mode)
        if self.mode not in MODES:
            tiling((1, 1), self.size, self.mode)  # raises the ConfigError naming the valid modes
        self.stride = None if self.mode == "whole" else (default_stride(self.size) if stride is None else int(stride))
        if self.stride is not None and not 1 <= self.stride <= self.size:
            raise ConfigError(f"data.stride: {self.stride} is not between 1 and the window size {self.size} "
                              "(the model's image size)")
        self._tiling = tiling
        image_ids = [str(i) for i in reader.ids]
        #: (reader index, window index) of each entry, and its id
        self._where: list[tuple[int, int]] = []
        self.ids: list[str] = []
        for k, sid in enumerate(image_ids):
            if self.mode == "whole":
                self._where.append((k, 0))
                self.ids.append(sid)
                continue
            t = tiling(self._shape(k), self.size, "slide", self.stride)
            for j, (y, x) in enumerate(t.origins):
                self._where.append((k, j))
                self.ids.append(window_id(sid, y, x))
        self._cache: tuple[int, np.ndarray, np.ndarray | None] | None = None

    # -- reader-like attributes --------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # num_classes, ignore_index, class_names, has_labels, root, folder
        if name.startswith("_") or name == "reader":
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _shape(self, k: int) -> tuple[int, int]:
        entries = getattr(self.reader, "_entries", None)
        if entries is not None:
            return _image_shape(entries[k][1])
        image = self.reader[k].image
        return int(image.shape[0]), int(image.shape[1])

    def _crops(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """All entries of image ``k``: ``[n, S, S, 3]`` and ``[n, S, S]`` (or None)."""
        if self._cache is None or self._cache[0] != k:
            sample = self.reader[k]
            image = np.asarray(sample.image)
            t = self._tiling(image.shape[:2], self.size, self.mode, self.stride)
            label = None if sample.label is None else t.label_crops(np.asarray(sample.label))
            self._cache = (k, t.crops(image), label)
        return self._cache[1], self._cache[2]

    def __getitem__(self, i: int) -> Sample:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"entry index must be an integer, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"entry index {i} out of range for {len(self)} entries")
        k, j = self._where[int(i)]
        images, labels = self._crops(k)
        if images.shape[0] <= j:
            raise DataError(f"{getattr(self.reader, 'folder', self.reader)}: image {self.reader.ids[k]!r} changed "
                            "size while it was read")
        return Sample(np.ascontiguousarray(images[j]), None if labels is None else np.ascontiguousarray(labels[j]),
                      self.ids[int(i)])

    def content_id(self) -> str:
        """16 hex digits naming the entries: the rule (mode, size, stride), the entry ids and
        the reader's content."""
        from ddps_core.training import content_id

        inner = self.reader.content_id()
        head = f"training-view {self.mode} {self.size} {self.stride} {len(self.ids)}\n".encode()
        return content_id([head, "\n".join(self.ids).encode(), inner.encode()])

    def __repr__(self) -> str:
        return f"TrainingView({len(self)} {self.mode} entries of {self.size} px from {self.reader!r})"
