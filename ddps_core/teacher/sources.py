"""Feature sources other than the diffusion feature store, with the interface that
:class:`~ddps_core.features.sampler.PixelSampler` and :func:`~ddps_core.teacher.predict.predict_store`
use from :class:`~ddps_core.features.store.FeatureStore`:

``len()``, ``feature_dim``, ``image_size``, ``image_ids``, ``has_labels``, ``num_classes``,
``ignore_index``, ``path``, ``source_id``, ``native(i)``, ``pixels(i, ys, xs, native=None)``,
``image_features(i)`` and ``label(i)``.

For these sources the features are computed at full resolution, so the "native" map of an
image IS its ``[D, S, S]`` feature map and ``pixels`` just gathers it (identity taps) - the
sampler works with them unchanged.

* :class:`RGBXYSource` - baseline (a): raw RGB scaled to ``[-1, 1]`` plus the normalised pixel
  coordinates ``x, y`` in ``[-1, 1]`` (``D = 5``), images squared with
  :func:`~ddps_core.datasets.to_square`.
* :class:`ArraySource` - in-memory feature maps and labels (tests, small experiments).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ddps_core.datasets import to_square
from ddps_core.errors import DataError
from ddps_core.features.store import image_index, pixel_coords

__all__ = ["ArraySource", "RGBXYSource", "rgbxy_features"]


class _FullResSource:
    """Common part: ``native(i)`` is the full ``[D, S, S]`` float32 map."""

    feature_dim: int
    image_size: int
    image_ids: list[str]
    has_labels: bool
    path: str

    def __len__(self) -> int:
        return len(self.image_ids)

    def _check_index(self, i: int) -> int:
        return image_index(i, len(self), self.path)

    def native(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_features(self, i: int) -> np.ndarray:
        """float32 ``[D, S, S]``."""
        return self.native(i)

    def pixels(self, i: int, ys: np.ndarray, xs: np.ndarray, native: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[n, D]``: the features of image ``i`` at pixels ``(ys, xs)``."""
        ys, xs = pixel_coords(ys, xs, self.image_size)
        m = self.native(i) if native is None else native
        return np.ascontiguousarray(m[:, ys, xs].T, dtype=np.float32)


def rgbxy_features(image: np.ndarray) -> np.ndarray:
    """float32 ``[5, H, W]`` of a uint8 ``H x W x 3`` image: ``r, g, b`` as ``v / 127.5 - 1``
    and ``x, y`` as ``2 * c / (size - 1) - 1`` (0 for a size of 1)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got {img.shape}")
    H, W = img.shape[:2]
    out = np.empty((5, H, W), dtype=np.float32)
    out[:3] = np.moveaxis(img.astype(np.float32), 2, 0) / np.float32(127.5) - np.float32(1.0)
    xs = np.linspace(-1.0, 1.0, W, dtype=np.float32) if W > 1 else np.zeros(1, np.float32)
    ys = np.linspace(-1.0, 1.0, H, dtype=np.float32) if H > 1 else np.zeros(1, np.float32)
    out[3] = xs[None, :]
    out[4] = ys[:, None]
    return out


class RGBXYSource(_FullResSource):
    """Baseline (a) features: ``(r, g, b, x, y)`` per pixel, ``D = 5``.

    :param reader_or_images: a dataset reader (``len``, ``reader[i] -> Sample``, ``.ids``,
        optionally ``.num_classes`` / ``.ignore_index``) or a sequence of samples: ``Sample`` /
        ``(image, label)`` / ``(image, label, id)`` tuples or bare uint8 ``H x W x 3`` images.
    :param image_size: ``S``; every image (and label) is squared with ``to_square``.
    :param num_classes, ignore_index: override the reader's.

    Images are read lazily (the last one is cached, since the sampler asks for an image's
    label and then its features).
    """

    feature_dim = 5

    def __init__(
        self,
        reader_or_images: Any,
        image_size: int,
        num_classes: int | None = None,
        ignore_index: int | None = None,
    ):
        self._src = reader_or_images
        self.image_size = int(image_size)
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.path = str(getattr(reader_or_images, "root", "<in-memory images>"))
        ids = getattr(reader_or_images, "ids", None)
        if ids is None:
            ids = [self._raw_id(k) for k in range(len(reader_or_images))]
        self.image_ids = [str(i) for i in ids]
        nc = num_classes if num_classes is not None else getattr(reader_or_images, "num_classes", None)
        self.num_classes = None if nc is None else int(nc)
        ig = ignore_index if ignore_index is not None else getattr(reader_or_images, "ignore_index", None)
        self.ignore_index = None if ig is None else int(ig)
        has = getattr(reader_or_images, "has_labels", None)
        if has is None:
            has = all(self._raw(k)[1] is not None for k in range(len(self))) if len(self) else False
        self.has_labels = bool(has)
        self.source_id = f"rgbxy-{self.image_size}"
        self._cache: tuple[int, np.ndarray, np.ndarray | None] | None = None

    def content_id(self) -> str:
        """16 hex digits naming the features and labels this source gives: the image size
        and its reader's content (or, for images in memory, their arrays)."""
        from ddps_core.training import content_id

        if hasattr(self._src, "content_id"):
            inner = self._src.content_id()
        else:
            inner = content_id(a for k in range(len(self)) for a in self._raw(k)[:2] if a is not None)
        return content_id([f"rgbxy {self.image_size} {inner}".encode()])

    def _raw(self, k: int) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        item = self._src[k]
        if isinstance(item, np.ndarray):
            return item, None, None
        if hasattr(item, "image"):  # Sample
            return item.image, item.label, getattr(item, "id", None)
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            return item[0], item[1], (item[2] if len(item) == 3 else None)
        raise DataError(f"{self.path}: item {k} is not an image, a Sample or an (image, label[, id]) tuple")

    def _raw_id(self, k: int) -> str:
        sid = self._raw(k)[2]
        return f"{k:06d}" if sid is None else str(sid)

    def _squared(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        i = self._check_index(i)
        if self._cache is None or self._cache[0] != i:
            image, label, _ = self._raw(i)
            image = np.asarray(image)
            if image.dtype != np.uint8:
                raise DataError(f"{self.path}: image {self.image_ids[i]} must be uint8, got {image.dtype}")
            img, lab = to_square(image, None if label is None else np.asarray(label), self.image_size)
            self._cache = (i, rgbxy_features(img), lab)
        return self._cache[1], self._cache[2]

    def native(self, i: int) -> np.ndarray:
        """float32 ``[5, S, S]`` (the full map: for this source native = full resolution)."""
        return self._squared(i)[0]

    def label(self, i: int) -> np.ndarray:
        """The squared label ``(S, S)``."""
        if not self.has_labels:
            raise DataError(f"{self.path}: this source has no labels")
        lab = self._squared(i)[1]
        if lab is None:
            raise DataError(f"{self.path}: image {self.image_ids[i]} has no label")
        return lab


class ArraySource(_FullResSource):
    """In-memory features ``[N, D, S, S]`` (float32) with optional labels ``[N, S, S]``."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray | None = None,
        image_ids: Sequence[str] | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        source_id: str = "arrays",
    ):
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 4 or feats.shape[2] != feats.shape[3]:
            raise ValueError(f"features must be [N, D, S, S], got {feats.shape}")
        self._features = feats
        N, D, S, _ = feats.shape
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (N, S, S):
                raise ValueError(f"labels must be {(N, S, S)}, got {labels.shape}")
        self._labels = labels
        self.feature_dim, self.image_size = int(D), int(S)
        self.image_ids = [f"{k:06d}" for k in range(N)] if image_ids is None else [str(i) for i in image_ids]
        if len(self.image_ids) != N:
            raise ValueError(f"{len(self.image_ids)} image ids for {N} images")
        self.has_labels = labels is not None
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.path = "<in-memory arrays>"
        self.source_id = source_id

    def native(self, i: int) -> np.ndarray:
        return self._features[self._check_index(i)]

    def label(self, i: int) -> np.ndarray:
        if self._labels is None:
            raise DataError(f"{self.path}: this source has no labels")
        return self._labels[self._check_index(i)]
