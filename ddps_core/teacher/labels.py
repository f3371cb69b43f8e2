"""Teacher labels written in resumable parts: ``<id>.png`` (the members' majority vote, at the
image's size), ``<id>_uncertainty.png`` (the Jensen-Shannon divergence of the members, 0..255
for 0..ln M), with a predictor that gives them ``<id>_probs.npy`` (the members' mean softmax,
float16 ``[K, H, W]``: soft labels) and ``scores.parquet`` (image_id, score, split, pixels per
class).

The labels stream: a part's images go through the predictor
(:class:`~ddps_core.inference.teacher.TeacherPredictor`: features, ensemble, labels) and only
its PNGs are written; no feature store is made for the images that are labelled.

A source's images are labelled in parts of :data:`PART_IMAGES`. A part's PNGs are written
first, then its rows to ``.parts/part-<k>.parquet``, so a killed run redoes at most one part,
and writers of disjoint parts touch disjoint files (they may run at the same time). Parts made
by another teacher (another weights file) are discarded. The steps are :func:`start_labels`
(once), :func:`label_parts` (per group of parts) and :func:`finish_labels` (once, at the end);
:func:`label_images` runs them in a row.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddps_core.datasets.common import npy_bytes, png_bytes
from ddps_core.errors import DataError
from ddps_core.io import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["PART_IMAGES", "PROBS", "ReaderImages", "finish_labels", "finished_labels", "label_images", "label_parts",
           "pending_parts", "start_labels", "teacher_id"]

PART_IMAGES = 64  # images labelled between two resume points
#: The file name end of an image's soft labels (``<id>_probs.npy``).
PROBS = "_probs.npy"


class ReaderImages:
    """The images of a dataset reader as a labelling source: ``image_ids``, ``image(i)``."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.image_ids = [str(i) for i in reader.ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image(self, i: int) -> np.ndarray:
        return self.reader[i].image

    def content_id(self) -> str:
        return self.reader.content_id()


def teacher_id(path: str | Path) -> str:
    """sha256 (16 hex digits) of a saved ensemble file: the teacher recorded with labels."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def label_parts_of(n: int) -> list[tuple[int, int]]:
    """Images ``[a, b)`` of every labelling part of an ``n``-image source."""
    return [(a, min(n, a + PART_IMAGES)) for a in range(0, n, PART_IMAGES)]


def _part_file(folder: Path, p: int) -> Path:
    return folder / ".parts" / f"part-{p:05d}.parquet"


def _finished_part(folder: Path, p: int, ids: list[str]) -> pd.DataFrame | None:
    """The rows of part ``p`` when it was finished for exactly ``ids``, else None."""
    part = _part_file(folder, p)
    if not part.is_file():
        return None
    try:
        df = pd.read_parquet(part)
    except (OSError, ValueError):
        return None
    return df if list(df["image_id"]) == ids else None


def finished_labels(folder: str | Path, teacher: str, ids: list[str]) -> pd.DataFrame | None:
    """The scores of a finished labelling of exactly ``ids`` for ``teacher`` in ``folder``, else
    None (then it is labelled again, part by part)."""
    folder = Path(folder)
    try:
        if (folder / "teacher.txt").read_text() != teacher:
            return None
        scores = pd.read_parquet(folder / "scores.parquet")
    except (OSError, ValueError):
        return None
    return scores if list(scores["image_id"]) == list(ids) else None


def start_labels(folder: str | Path, teacher: str) -> None:
    """Make ``folder/.parts`` for ``teacher``; parts left by another teacher are discarded.
    Run once before parts are labelled (concurrent part writers must not race on this)."""
    parts = Path(folder) / ".parts"
    marker = parts / "teacher.txt"
    if parts.is_dir() and (not marker.is_file() or marker.read_text() != teacher):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, teacher)


def pending_parts(source: Any, folder: str | Path) -> list[int]:
    """The parts of ``source`` not yet finished in ``folder``."""
    ids = list(source.image_ids)
    return [p for p, (a, b) in enumerate(label_parts_of(len(ids)))
            if _finished_part(Path(folder), p, ids[a:b]) is None]


def label_parts(predictor: Any, source: Any, folder: str | Path, split: str,
                parts: list[int] | None = None, progress: Callable[[int, int], Any] | None = None,
                on_image: Callable[[int, np.ndarray], Any] | None = None) -> int:
    """Label the images of ``parts`` (all by default) of ``source`` (``image_ids``,
    ``image(i)``: e.g. :class:`ReaderImages`) with ``predictor`` (a
    :class:`~ddps_core.inference.Predictor` with an uncertainty) into ``folder`` (after
    :func:`start_labels`); finished parts are kept. Each part's PNGs are written first, then
    its rows to ``.parts/part-<p>.parquet``. Writers of disjoint parts touch disjoint files, so
    they may run concurrently. ``progress(done, total)`` counts this call's images. Returns the
    number of images predicted."""
    from ddps_core.metrics.files import load_label_map

    folder = Path(folder)
    k = predictor.num_classes
    ids = list(source.image_ids)
    ranges = label_parts_of(len(ids))
    parts = list(range(len(ranges))) if parts is None else [int(p) for p in parts]
    total = sum(ranges[p][1] - ranges[p][0] for p in parts)
    # 0..255 for 0..the largest uncertainty (ln M for M members; one member is never uncertain)
    heat_scale = 255.0 / float(getattr(predictor, "uncertainty_max", None) or 1.0)
    batch = max(1, int(getattr(predictor, "batch", 16)))
    done = predicted = 0
    for p in parts:
        a, b = ranges[p]
        if _finished_part(folder, p, ids[a:b]) is not None:
            if on_image is not None:
                for i in range(a, b):
                    on_image(i, load_label_map(folder / f"{ids[i]}.png"))
            done += b - a
            if progress is not None:
                progress(done, total)
            continue
        rows = []
        for c in range(a, b, batch):
            idx = list(range(c, min(b, c + batch)))
            for i, pred in zip(idx, predictor([source.image(i) for i in idx])):
                image_id = ids[i]
                atomic_write_bytes(folder / f"{image_id}.png", png_bytes(pred.labels))
                heat = np.clip(pred.uncertainty * heat_scale, 0, 255).astype(np.uint8)
                atomic_write_bytes(folder / f"{image_id}_uncertainty.png", png_bytes(heat))
                if pred.probs is not None:
                    atomic_write_bytes(folder / f"{image_id}{PROBS}", npy_bytes(pred.probs.astype(np.float16)))
                counts = np.bincount(pred.labels.ravel(), minlength=k)[:k]
                rows.append({"image_id": image_id, "score": float(pred.score), "split": split,
                             **{f"pixels_{c}": int(v) for c, v in enumerate(counts)}})
                if on_image is not None:
                    on_image(i, pred.labels)
                done += 1
                predicted += 1
                if progress is not None:
                    progress(done, total)
        with atomic_path(_part_file(folder, p)) as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
    return predicted


def finish_labels(source: Any, folder: str | Path, teacher: str, num_classes: int) -> pd.DataFrame:
    """Join every part's rows into ``scores.parquet`` (in image order), record ``teacher``
    and remove ``.parts``; every part must be finished."""
    folder = Path(folder)
    ids = list(source.image_ids)
    frames = []
    for p, (a, b) in enumerate(label_parts_of(len(ids))):
        df = _finished_part(folder, p, ids[a:b])
        if df is None:
            raise DataError(f"{_part_file(folder, p)}: labelling part {p} (images {a}..{b - 1}) is not finished")
        frames.append(df)
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["image_id", "score", "split", *(f"pixels_{c}" for c in range(num_classes))])
    with atomic_path(folder / "scores.parquet") as tmp:
        scores.to_parquet(tmp, index=False)
    atomic_write_text(folder / "teacher.txt", teacher)
    shutil.rmtree(folder / ".parts", ignore_errors=True)
    return scores


def label_images(predictor: Any, source: Any, folder: str | Path, split: str,
                 teacher: str, progress: Callable[[int, int], Any] | None = None,
                 on_image: Callable[[int, np.ndarray], Any] | None = None) -> pd.DataFrame:
    """Label every image of ``source`` into ``folder``: ``<id>.png`` (majority vote),
    ``<id>_uncertainty.png`` (Jensen-Shannon heat map, 0..255 for 0..ln M) and
    ``scores.parquet`` (image_id, score, split, per-class pixel counts).

    Resumable: images are labelled in parts of :data:`PART_IMAGES`; a part's PNGs are written
    first, then its rows to ``.parts/part-<k>.parquet``, so a killed run redoes at most one
    part. Parts made for another ``teacher`` id are discarded. ``on_image(i, labels)`` sees
    every image's labels, also those of resumed parts. The steps (:func:`start_labels`,
    :func:`label_parts`, :func:`finish_labels`) can also be run apart, with disjoint parts in
    concurrent tasks.
    """
    start_labels(folder, teacher)
    label_parts(predictor, source, folder, split, None, progress, on_image)
    return finish_labels(source, folder, teacher, predictor.num_classes)
