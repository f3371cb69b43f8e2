"""The ensemble stages: train the teacher per feature method, label the test split, report.

Methods (``ensemble.methods``), all through the same sampler / ensemble / predictor:

* ``ddpm``: features of the trained diffusion model (``<features.out>/<split>.zarr``);
* ``random_unet``: the same extraction with a randomly initialised UNet of the same preset
  (``<features.out>/random_unet/<split>.zarr``);
* ``rgbxy``: raw RGB + normalised (x, y), computed on the fly from the dataset.

Outputs: ``<ensemble.out>/<method>/ensemble.safetensors`` (+ ``train.json``, the resume
checkpoint ``checkpoint.pt``), and ``<labels_out>/<method>/<split>/``: ``<id>.png``
(majority-vote labels), ``<id>_uncertainty.png`` (Jensen-Shannon heat map) and
``scores.parquet`` (image_id, score, split, per-class pixel counts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddps_core import storage
from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, load_image
from ddps_core.datasets.common import png_bytes
from ddps_core.errors import DataError
from ddps_core.features.sampler import PixelSampler
from ddps_core.features.stage import open_store, store_exists, store_path
from ddps_core.io import atomic_path, atomic_write_bytes, atomic_write_text
from ddps_core.metrics import ConfusionAccumulator, SegmentationResult
from ddps_core.progress import CallbackReporter, Reporter
from ddps_core.teacher.ensemble import PixelEnsemble, source_id_of
from ddps_core.teacher.predict import predict_store
from ddps_core.teacher.sources import RGBXYSource
from ddps_core.teacher.train import train_ensemble

WEIGHTS = "ensemble.safetensors"


def feature_source(settings: Settings, method: str, split: str) -> Any:
    """The pixel-feature source of ``method`` for ``split`` (labels included)."""
    if method == "rgbxy":
        reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
        size = open_store(settings, split, read_only=True).image_size \
            if store_exists(settings, split) else _model_size(settings)
        return RGBXYSource(reader, size, num_classes=reader.num_classes,
                           ignore_index=settings.data.ignore_index)
    variant = "ddpm" if method == "ddpm" else "random_unet"
    path = store_path(settings, split, variant)
    if not store_exists(settings, split, variant):
        raise DataError(f"{path}: no feature store for method {method!r}; run the extract stage"
                        + (" with features.random_unet: true" if variant != "ddpm" else ""))
    store = open_store(settings, split, variant, read_only=True)
    if not store.is_complete():
        raise DataError(f"{path}: feature store incomplete ({store.n_done()}/{len(store)} images); "
                        "rerun the extract stage")
    return store


def _model_size(settings: Settings) -> int:
    from ddps_core.diffusion.presets import get_preset

    return get_preset(settings.ddpm.preset).image_size


def _num_classes(settings: Settings) -> int:
    return DDPMSegFolder(settings.data.out, "train").num_classes


def train_method(settings: Settings, method: str,
                 progress: Callable[..., Any] | None = None, report: Reporter | None = None) -> dict[str, Any]:
    """Train (or resume) the ensemble of ``method`` on the labelled training split."""
    cfg = settings.teacher
    source = feature_source(settings, method, "train")
    n = len(source) if cfg.n_train is None else min(cfg.n_train, len(source))
    sampler = PixelSampler(source, batch_size=cfg.batch_size, buffer_images=cfg.buffer_images,
                           seed=cfg.seed, ignore_index=settings.data.ignore_index,
                           min_class_pixels=cfg.min_class_pixels, image_indices=list(range(n)))
    ensemble = PixelEnsemble(source.feature_dim, _num_classes(settings), members=cfg.members,
                             seed=cfg.seed, source_id=source_id_of(source))
    out = Path(cfg.out) / method
    out.mkdir(parents=True, exist_ok=True)
    # progress(epoch, updates, active, loss) gets the trainer's progress as before
    legacy = CallbackReporter((lambda _t, done, _n, **v: "loss" in v and progress(
        int(v["epoch"]), done, int(v["active"]), v["loss"])) if progress else None)
    summary = train_ensemble(
        sampler, ensemble, lr=cfg.lr, max_epochs=cfg.max_epochs, patience=cfg.patience,
        min_epoch=cfg.min_epoch, bootstrap=cfg.bootstrap, seed=cfg.seed, task=method,
        report=report or legacy, inputs={"features": source_id_of(source)},
        checkpoint_path=out / "checkpoint.pt", checkpoint_every=cfg.checkpoint_every)
    ensemble.save(out / WEIGHTS)
    record = {"method": method, "n_train_images": n, "feature_dim": source.feature_dim,
              "source_id": source_id_of(source), **summary.record()}
    atomic_write_text(out / "train.json", json.dumps(record, indent=2, default=str))
    return {**record, "seconds": summary.seconds}


def load_method(settings: Settings, method: str) -> PixelEnsemble:
    path = Path(settings.teacher.out) / method / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: no trained ensemble for method {method!r}; run train_ensemble")
    return PixelEnsemble.load(path)


PART_IMAGES = 64  # images labelled between two resume points


def teacher_id(path: str | Path) -> str:
    """sha256 (16 hex digits) of a saved ensemble file: the teacher recorded with labels."""
    import hashlib

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


def start_labels(folder: str | Path, teacher: str) -> None:
    """Make ``folder/.parts`` for ``teacher``; parts left by another teacher are discarded.
    Run once before parts are labelled (concurrent part writers must not race on this)."""
    import shutil

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


def label_parts(ensemble: PixelEnsemble, source: Any, folder: str | Path, split: str,
                parts: list[int] | None = None, progress: Callable[[int, int], Any] | None = None,
                on_image: Callable[[int, np.ndarray], Any] | None = None) -> int:
    """Label the images of ``parts`` (all by default) of ``source`` into ``folder``
    (after :func:`start_labels`); finished parts are kept. Each part's PNGs are written
    first, then its rows to ``.parts/part-<p>.parquet``. Writers of disjoint parts touch
    disjoint files, so they may run concurrently. ``progress(done, total)`` counts this
    call's images. Returns the number of images predicted."""
    from ddps_core.metrics.files import load_label_map

    folder = Path(folder)
    k = ensemble.num_classes
    ids = list(source.image_ids)
    ranges = label_parts_of(len(ids))
    parts = list(range(len(ranges))) if parts is None else [int(p) for p in parts]
    total = sum(ranges[p][1] - ranges[p][0] for p in parts)
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
        for i, (image_id, labels, unc, score) in zip(range(a, b), predict_store(ensemble, source, image_indices=list(range(a, b)))):
            atomic_write_bytes(folder / f"{image_id}.png", png_bytes(labels.astype(np.uint8)))
            heat = np.clip(unc / np.log(ensemble.members) * 255.0, 0, 255).astype(np.uint8)
            atomic_write_bytes(folder / f"{image_id}_uncertainty.png", png_bytes(heat))
            counts = np.bincount(labels.ravel(), minlength=k)[:k]
            rows.append({"image_id": image_id, "score": float(score), "split": split,
                         **{f"pixels_{c}": int(v) for c, v in enumerate(counts)}})
            if on_image is not None:
                on_image(i, labels)
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
    import shutil

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


def label_images(ensemble: PixelEnsemble, source: Any, folder: str | Path, split: str,
                 teacher: str, progress: Callable[[int, int], Any] | None = None,
                 on_image: Callable[[int, np.ndarray], Any] | None = None) -> pd.DataFrame:
    """Label every image of ``source`` (a feature store or RGB+xy source) into ``folder``:
    ``<id>.png`` (majority vote), ``<id>_uncertainty.png`` (Jensen-Shannon heat map, 0..255
    for 0..ln M) and ``scores.parquet`` (image_id, score, split, per-class pixel counts).

    Resumable: images are labelled in parts of :data:`PART_IMAGES`; a part's PNGs are written
    first, then its rows to ``.parts/part-<k>.parquet``, so a killed run redoes at most one
    part. Parts made by another ``teacher`` (the ensemble file's hash) are discarded.
    ``on_image(i, labels)`` sees every image's labels, also those of resumed parts.
    The steps (:func:`start_labels`, :func:`label_parts`, :func:`finish_labels`) can also be
    run apart, with disjoint parts in concurrent tasks.
    """
    start_labels(folder, teacher)
    label_parts(ensemble, source, folder, split, None, progress, on_image)
    return finish_labels(source, folder, teacher, ensemble.num_classes)


def label_split(settings: Settings, method: str, split: str, labels_out: str | Path,
                progress: Callable[[int, int], Any] | None = None) -> SegmentationResult | None:
    """Predict every image of ``split`` with ``method``'s ensemble (:func:`label_images`,
    resumable) into ``<labels_out>/<method>/<split>/``. Returns the metrics when the split
    has labels."""
    ensemble = load_method(settings, method)
    source = feature_source(settings, method, split)
    acc = ConfusionAccumulator(ensemble.num_classes, ignore_index=settings.data.ignore_index,
                               boundary_ratio=settings.evaluate.boundary_ratio) \
        if getattr(source, "has_labels", False) else None
    ids = list(source.image_ids)

    def score(i: int, labels: np.ndarray) -> None:
        if acc is not None:
            acc.update(labels, source.label(i), ids[i])

    label_images(ensemble, source, Path(labels_out) / method / split, split,
                 teacher_id(Path(settings.teacher.out) / method / WEIGHTS), progress, score)
    return acc.result() if acc is not None else None


def label_jobs(settings: Settings) -> list[tuple[str, str]]:
    """(method, split) pairs of stage ``label``: the test split with every method, the
    unlabelled pool with ``ddpm`` (when its features are extracted)."""
    jobs = [(m, "test") for m in settings.teacher.methods]
    if "ddpm" in settings.teacher.methods and "unlabeled" in settings.features.splits:
        jobs.append(("ddpm", "unlabeled"))
    return jobs


def _label_folder(settings: Settings, method: str, split: str) -> Path:
    return Path(settings.teacher.labels_out) / method / split


def plan_label_split(settings: Settings, method: str, split: str, n_tasks: int) -> list[list[int]]:
    """Start labelling ``split`` with ``method`` (:func:`start_labels`) and deal its
    unfinished parts round-robin into at most ``n_tasks`` disjoint groups, one per task."""
    folder = _label_folder(settings, method, split)
    start_labels(folder, teacher_id(Path(settings.teacher.out) / method / WEIGHTS))
    todo = pending_parts(feature_source(settings, method, split), folder)
    return [todo[i::n_tasks] for i in range(max(1, n_tasks)) if todo[i::n_tasks]]


def label_split_parts(settings: Settings, method: str, split: str, parts: list[int],
                      progress: Callable[[int, int], Any] | None = None) -> int:
    """Label ``parts`` of ``split`` (one task's group of :func:`plan_label_split`)."""
    return label_parts(load_method(settings, method), feature_source(settings, method, split),
                       _label_folder(settings, method, split), split, parts, progress)


def finish_label_split(settings: Settings, method: str, split: str) -> int:
    """Write ``split``'s ``scores.parquet`` once every part is labelled; its image count."""
    source = feature_source(settings, method, split)
    teacher = teacher_id(Path(settings.teacher.out) / method / WEIGHTS)
    return len(finish_labels(source, _label_folder(settings, method, split), teacher,
                             _num_classes(settings)))


def overlay_figures(settings: Settings, method: str, split: str, folder: str | Path,
                    out_dir: str | Path, limit: int = 8) -> list[Path | str]:
    """``image | truth | prediction [| uncertainty]`` PNGs of the first ``limit`` images of
    ``split`` predicted in ``folder`` (the uncertainty panel, when ``<id>_uncertainty.png``
    exists, stretched to the image's own maximum). ``out_dir`` may be a URL."""
    from ddps_core.datasets import to_square
    from ddps_core.viz import grid, overlay

    reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
    folder = Path(folder)
    written = []
    for sample in list(reader)[:limit]:
        pred = np.asarray(load_image(folder / f"{sample.id}.png"))[..., 0]
        image, gt = to_square(sample.image, sample.label, pred.shape[0])
        ign = settings.data.ignore_index
        row = [image, overlay(image, gt, ignore_index=ign), overlay(image, pred, ignore_index=ign)]
        heat_path = folder / f"{sample.id}_uncertainty.png"
        if heat_path.is_file():
            heat = np.asarray(load_image(heat_path)).astype(np.float32)
            row.append((heat * (255.0 / max(float(heat.max()), 1.0))).astype(np.uint8))  # stretched
        path = storage.join(out_dir, f"{method}_{sample.id}.png")
        storage.write_bytes(path, png_bytes(grid([row], scale=max(1, 128 // pred.shape[0]))),
                            settings.storage.options)
        written.append(path)
    return written


def run_train(settings: Settings, progress: Callable[..., Any] | None = None,
              log: Callable[[str], None] | None = None, report: Reporter | None = None) -> dict[str, Any]:
    """Stage ``train_ensemble``: one ensemble per method (resumes where it stopped)."""
    out: dict[str, Any] = {}
    for method in settings.teacher.methods:
        rec = train_method(settings, method, progress, report)
        if log:
            log(f"{method}: {rec['epochs']} epochs ({rec['reason']}), {rec['seconds']:.0f} s")
        out[method] = {k: rec[k] for k in ("epochs", "reason", "seconds", "feature_dim")}
    return out


def run_label(settings: Settings, progress: Callable[[str, int, int], Any] | None = None
              ) -> dict[str, Any]:
    """Stage ``label``: the test split with every method; the unlabelled pool with ``ddpm``
    (when its features were extracted)."""
    out: dict[str, Any] = {}
    for method in settings.teacher.methods:
        splits = ["test"]
        if method == "ddpm" and "unlabeled" in settings.features.splits:
            splits.append("unlabeled")
        for split in splits:
            name = f"{method}/{split}"
            label_split(settings, method, split, settings.teacher.labels_out,
                        (lambda d, n, s=name: progress(s, d, n)) if progress else None)
            scores = pd.read_parquet(Path(settings.teacher.labels_out) / method / split / "scores.parquet")
            out[name] = {"images": len(scores), "mean_score": float(scores["score"].mean())}
    return out


def prediction_folders(settings: Settings, student: bool | None = None) -> dict[str, Path]:
    """Method -> folder of its test-split label PNGs: every teacher method, then the student
    (``evaluate.student``, or ``student``) whose stage writes ``<student.out>/test/``."""
    folders = {m: Path(settings.teacher.labels_out) / m / "test" for m in settings.teacher.methods}
    if settings.evaluate.student if student is None else student:
        folders["student"] = Path(settings.student.out) / "test"
    return folders


def report_locations(settings: Settings) -> dict[str, Path | str]:
    """Where stage ``evaluate`` writes, under ``evaluate.reports`` (a folder or a URL)."""
    base = settings.evaluate.reports
    return {"report": storage.join(base, "ddpm_seg.parquet"),
            "metrics": storage.join(base, "metrics", "ddpm_seg.json"),
            "figures": storage.join(base, "figures", "overlays")}


def run_evaluate(settings: Settings, report: str | Path | None = None,
                 metrics: str | Path | None = None,
                 figures: str | Path | None = None, student: bool | None = None) -> pd.DataFrame:
    """Stage ``evaluate``: every method's test labels (:func:`prediction_folders`) against
    the (squared) ground truth, in one report with a ``method`` column (the ``ddps
    evaluate`` schema), DVC metrics JSON and overlay figures. Unless given, the outputs go
    to :func:`report_locations` (``evaluate.reports``); each is written atomically (temp file
    + rename locally, one put on an object store)."""
    from ddps_core.metrics import REPORT_COLUMNS, report_frame, write_report
    from ddps_core.metrics.files import load_label_map

    where = report_locations(settings)
    report = where["report"] if report is None else report
    metrics = where["metrics"] if metrics is None else metrics
    figures = where["figures"] if figures is None else figures
    truth = open_store(settings, "test", read_only=True)
    names = DDPMSegFolder(settings.data.out, "test").class_names
    frames, summary = [], {}
    for method, folder in prediction_folders(settings, student).items():
        acc = ConfusionAccumulator(truth.num_classes, ignore_index=settings.data.ignore_index,
                                   boundary_ratio=settings.evaluate.boundary_ratio)
        for i, image_id in enumerate(truth.image_ids):
            path = folder / f"{image_id}.png"
            if not path.is_file():
                stage = "train_student" if method == "student" else "label"
                raise DataError(f"{path}: missing prediction; run the {stage} stage")
            acc.update(load_label_map(path), truth.label(i), image_id, source=str(path))
        result = acc.result()
        frame = report_frame(result, names)
        frame.insert(0, "method", method)
        frames.append(frame)
        summary[method] = {k: float(result.summary[k]) for k in ("miou", "mbiou", "aacc", "macc")}
        overlay_figures(settings, method, "test", folder, figures, settings.teacher.figures)
    df = pd.concat(frames, ignore_index=True)[["method", *REPORT_COLUMNS]]
    write_report(df, report, settings.storage.options)
    storage.write_text(metrics, json.dumps(summary, indent=2), settings.storage.options)
    return df
