"""Fill a :class:`~ddps_core.features.store.FeatureStore` with an extractor's features.

Work is done shard by shard: the images of one shard are read, squared to the model size
(:func:`~ddps_core.datasets.to_square`), run through the extractor in batches of at most
``batch_size`` images that never cross a shard boundary, and the shard is written once
(:meth:`FeatureStore.write_shard`); reading the next shard and writing the previous one
overlap the current shard's forwards (one thread each). Because batches are formed within a
shard, a shard's values do not depend on which other shards were already done: a resumed run
gives the same bytes as an uninterrupted one (on the same device and thread settings).

To parallelise, give each worker a disjoint list of shards (see :func:`shard_ranges`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ddps_core.datasets import to_square
from ddps_core.errors import ConfigError, DataError

from .extract import FeatureExtractor, preprocess
from .store import FeatureStore, shard_ranges

__all__ = ["check_compatible", "extract_to_store", "shard_ranges"]


def check_compatible(store: FeatureStore, extractor: FeatureExtractor) -> None:
    """Raise :class:`ConfigError` unless ``store`` records exactly ``extractor``'s settings."""
    want = extractor.store_settings()
    have = store.attrs
    diffs = []
    for key, value in want.items():
        stored = have.get(key)
        if key == "shapes":
            value = {k: list(v) for k, v in value.items()}
        if stored != value:
            diffs.append(f"{key}: stored {stored!r}, extractor {value!r}")
    if diffs:
        raise ConfigError(f"{store.path}: feature store does not match the extractor ({'; '.join(diffs)})")


def _unpack(item: Any) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(image, label, id) from a Sample, an (image, label[, id]) tuple or a bare image."""
    if hasattr(item, "image"):
        return item.image, getattr(item, "label", None), getattr(item, "id", None)
    if isinstance(item, tuple):
        if len(item) == 2:
            return item[0], item[1], None
        if len(item) == 3:
            return item[0], item[1], item[2]
    return item, None, None


def _square(store: FeatureStore, item: Any, i: int, S: int, labels: np.ndarray | None,
            a: int) -> torch.Tensor:
    """Image ``i`` of the source, checked, squared to ``S`` and preprocessed; its squared
    label goes to ``labels[i - a]`` when the store holds labels."""
    image, label, sid = _unpack(item)
    if sid is not None and str(sid) != store.image_ids[i]:
        raise DataError(
            f"{store.path}: image {i} of the source has id {sid!r}, the store expects "
            f"{store.image_ids[i]!r} (same split, same order?)"
        )
    name = store.image_ids[i]
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{store.path}: image {name!r} must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if store.has_labels:
        if label is None:
            raise DataError(f"{store.path}: image {name!r} has no label, but the store holds labels")
        label = np.asarray(label)
        if label.shape != image.shape[:2]:
            raise DataError(f"{store.path}: label of {name!r} has shape {label.shape}, image {image.shape[:2]}")
        image, label = to_square(image, label, S)
        labels[i - a] = label
    else:
        image, _ = to_square(image, None, S)
    return preprocess(image, S)


def extract_to_store(
    source: Sequence[Any],
    extractor: FeatureExtractor,
    store: FeatureStore,
    shards: Iterable[int] | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Compute and write the features of ``shards`` (all by default) of ``store``.

    :param source: indexable, ``len(source) == len(store)``; item ``i`` is a
        :class:`~ddps_core.datasets.Sample` (its id must equal the store's ``image_ids[i]``),
        an ``(image, label)`` tuple or a uint8 ``HxWx3`` image.
    :param shards: the shards this worker owns; shards already done are skipped.
    :param progress: called after each written shard with the store's total of done images.
    :returns: ``{"shards_written", "shards_skipped", "images_written", "images_skipped"}``.
    """
    if batch_size < 1:
        raise ConfigError(f"features.batch_size must be >= 1, got {batch_size}")
    check_compatible(store, extractor)
    if len(source) != len(store):
        raise DataError(f"{store.path}: store has {len(store)} images but the source yields {len(source)}")
    ranges = {k: (a, b) for k, a, b in shard_ranges(store)}
    todo = sorted(ranges) if shards is None else [int(k) for k in shards]
    bad = [k for k in todo if k not in ranges]
    if bad:
        raise ConfigError(f"{store.path}: shards {bad} out of range 0..{len(ranges) - 1}")
    store.authorize()  # a writer that may not write stops before computing anything
    S = store.image_size
    counts = {"shards_written": 0, "shards_skipped": 0, "images_written": 0, "images_skipped": 0}
    # Which of this worker's shards are done is read once: nobody else writes them (a shard
    # has one owner), and a per-shard read would wait on the writer thread's zarr calls.
    done = store.done_mask()
    ranges_todo = []
    for k in todo:
        a, b = ranges[k]
        if done[a:b].all():
            counts["shards_skipped"] += 1
            counts["images_skipped"] += b - a
        else:
            ranges_todo.append((k, a, b))

    def inputs(a: int, b: int) -> tuple[list[torch.Tensor], np.ndarray | None]:
        """Shard ``[a, b)``'s preprocessed batches (never crossing the shard) and labels."""
        labels = np.empty((b - a, S, S), dtype=np.uint16) if store.has_labels else None
        batches = []
        for b0 in range(a, b, batch_size):
            b1 = min(b, b0 + batch_size)
            batches.append(torch.stack([_square(store, source[i], i, S, labels, a) for i in range(b0, b1)]))
        return batches, labels

    # Three stages overlap: a reader thread decodes and squares shard k+1's images, the
    # calling thread runs shard k's forwards, and a writer thread writes shard k-1. One shard
    # is in flight per stage, so at most two shards' feature buffers (and two shards' input
    # images) are in memory. Decoding and writing mostly run outside the GIL. Each shard is
    # still written whole and marked done only after its data is durable
    # (FeatureStore.write_shard), and a shard's values do not depend on the threads.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        pending: Future | None = None

        def finish(job: Future | None) -> None:
            if job is None:
                return
            job.result()  # re-raises a write error here
            if progress is not None:
                progress(store.n_done())

        next_inputs = reader.submit(inputs, *ranges_todo[0][1:]) if ranges_todo else None
        for j, (k, a, b) in enumerate(ranges_todo):
            try:
                batches, labels = next_inputs.result()  # a bad image raises here
            except BaseException:
                finish(pending)  # the previous shard's write still completes and counts
                raise
            if j + 1 < len(ranges_todo):
                next_inputs = reader.submit(inputs, *ranges_todo[j + 1][1:])
            # in the store's layout on the CPU (written as they are); pinned on CUDA
            feats = extractor.shard_buffers({n: store.shapes[n] for n in store.names}, b - a)
            b0 = 0
            for x in batches:
                extractor.extract_into(x, feats, b0)
                b0 += x.shape[0]
            finish(pending)
            pending = writer.submit(store.write_shard, k, feats, labels)
            counts["shards_written"] += 1
            counts["images_written"] += b - a
        finish(pending)
    return counts
