"""Stages ``train_teacher`` and ``label``: the teacher and its baselines, trained on the
labelled training split, then labelling the test split (each) and the unlabelled pool (the
teacher).

Every method goes through the same sampler, ensemble and predictor; only the pixel features
differ:

* ``teacher``: the trained diffusion model's features (training: ``<features.out>/train.zarr``);
* ``random_unet`` (a baseline): a randomly initialised UNet's features
  (training: ``<features.out>/random_unet/train.zarr``);
* ``rgbxy`` (a baseline): raw RGB + normalised (x, y), computed on the fly from the dataset.

Labelling streams (:mod:`ddps_core.inference.teacher`): the test split and the pool go through
the diffusion model, the features and the ensemble window by window, with no feature store,
and their labels are written at each image's size.

Outputs: ``<teacher.out>/ensemble.safetensors`` (and ``train.json``, the resume checkpoint
``checkpoint.pt``; a baseline's under ``<teacher.baselines_out>/<name>/``), and
``<teacher.labels_out>/<method>/<split>/`` (:mod:`.labels`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.errors import DataError
from ddps_core.features.sampler import PixelSampler
from ddps_core.datasets.training import entries_of_first_images, image_id_of
from ddps_core.features.stage import model_size, open_store, store_exists, store_path, training_reader
from ddps_core.io import atomic_write_text, remove_stale
from ddps_core.progress import Reporter
from ddps_core.stages import Stage, Step
from ddps_core.teacher.ensemble import PixelEnsemble, source_id_of
from ddps_core.teacher.labels import (PROBS, ReaderImages, finish_labels, finished_labels, label_parts, pending_parts,
                                      start_labels, teacher_id)
from ddps_core.teacher.sources import RGBXYSource
from ddps_core.teacher.train import train_ensemble

__all__ = ["LABEL", "TRAIN_TEACHER", "WEIGHTS", "feature_source", "label_folder", "load_method", "methods",
           "model_folder", "soft_labels"]

WEIGHTS = "ensemble.safetensors"
#: In the pool's labels folder when the pool is not labelled: why.
NO_POOL = "not_labelled.txt"
TEACHER = "teacher"


def methods(settings: Settings) -> list[str]:
    """The teacher, then its baselines."""
    return [TEACHER, *settings.teacher.baselines]


def model_folder(settings: Settings, method: str) -> Path:
    """``teacher.out`` for the teacher, ``<teacher.baselines_out>/<name>`` for a baseline."""
    cfg = settings.teacher
    return Path(cfg.out) if method == TEACHER else Path(cfg.baselines_out) / method


def label_folder(settings: Settings, method: str, split: str) -> Path:
    return Path(settings.teacher.labels_out) / method / split


def feature_source(settings: Settings, method: str, split: str) -> Any:
    """The pixel features of ``method`` for ``split``, labels included: a complete feature
    store, or the RGB+xy source."""
    if method == "rgbxy":
        reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
        size = open_store(settings, split, read_only=True).image_size \
            if store_exists(settings, split) else model_size(settings)
        if split == "train":  # the entries the teacher trains on: data.resize, as the feature store's
            reader = training_reader(settings, reader, size)
        return RGBXYSource(reader, size, num_classes=reader.num_classes,
                           ignore_index=settings.data.ignore_index)
    variant = "ddpm" if method == TEACHER else method
    path = store_path(settings, split, variant)
    if not store_exists(settings, split, variant):
        raise DataError(f"{path}: no feature store for the {method}; run the extract stage"
                        + (f" with {method} in teacher.baselines" if method != TEACHER else ""))
    store = open_store(settings, split, variant, read_only=True)
    if not store.is_complete():
        raise DataError(f"{path}: feature store incomplete ({store.n_done()}/{len(store)} images); "
                        "rerun the extract stage")
    return store


def _num_classes(settings: Settings) -> int:
    return DDPMSegFolder(settings.data.out, "train").num_classes


def load_method(settings: Settings, method: str) -> PixelEnsemble:
    """The trained ensemble of ``method`` (the teacher or a baseline)."""
    path = model_folder(settings, method) / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: no trained {method}; run the train_teacher stage")
    return PixelEnsemble.load(path)


# --------------------------------------------------------------------------- train_teacher
def train_method(settings: Settings, method: str, report: Reporter) -> dict[str, Any]:
    """Train (or resume) the ensemble of ``method`` on the labelled training split."""
    cfg = settings.teacher
    source = feature_source(settings, method, "train")
    # teacher.n_train counts images: in slide mode an image is several entries (its windows)
    entries = entries_of_first_images(source.image_ids, cfg.n_train)
    n = len({image_id_of(source.image_ids[i]) for i in entries})
    sampler = PixelSampler(source, batch_size=cfg.batch_size, buffer_images=cfg.buffer_images,
                           seed=cfg.seed, ignore_index=settings.data.ignore_index,
                           min_class_pixels=cfg.min_class_pixels, image_indices=entries)
    if sampler.num_pixels() < 2:  # nothing to train on: refuse before anything is written
        raise DataError(f"{Path(settings.data.out) / 'real' / 'train'}: the training split has no labelled pixel "
                        f"to train the {method} on: every label pixel of its first {n} image(s) is the ignore "
                        f"index {settings.data.ignore_index}"
                        + (f" or of a class with fewer than teacher.min_class_pixels={cfg.min_class_pixels} "
                           "pixels in its image" if cfg.min_class_pixels > 1 else ""))
    ensemble = PixelEnsemble(source.feature_dim, _num_classes(settings), members=cfg.members,
                             seed=cfg.seed, source_id=source_id_of(source))
    out = model_folder(settings, method)
    out.mkdir(parents=True, exist_ok=True)
    # a checkpoint of another run (other settings or features) is not resumed: it starts over
    summary = train_ensemble(
        sampler, ensemble, lr=cfg.lr, max_epochs=cfg.max_epochs, patience=cfg.patience,
        min_epoch=cfg.min_epoch, bootstrap=cfg.bootstrap, seed=cfg.seed, task=method, report=report,
        inputs={"features": source.content_id()},  # same names, other images or labels: start over
        checkpoint_path=out / "checkpoint.pt", checkpoint_every=cfg.checkpoint_every)
    ensemble.save(out / WEIGHTS)
    record = {"method": method, "n_train_images": n, "n_train_entries": len(entries),
              "feature_dim": source.feature_dim,
              "source_id": source_id_of(source), **summary.record()}
    atomic_write_text(out / "train.json", json.dumps(record, indent=2, default=str))
    report.log(f"{method}: {record['epochs']} epochs ({record['reason']}) -> {out}")
    return {**record, "seconds": summary.seconds, "resumed_from": summary.resumed_from}


def train_teacher(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``train_teacher``: the teacher, then each baseline (resumes where it stopped)."""
    return {m: {k: v for k, v in train_method(settings, m, report).items()
                if k in ("epochs", "reason", "seconds", "feature_dim", "resumed_from")}
            for m in methods(settings)}


TRAIN_TEACHER = Stage("train_teacher", main=train_teacher,
                      products=lambda s: [s.teacher.out, s.teacher.baselines_out])


# --------------------------------------------------------------------------- label
def label_jobs(settings: Settings) -> list[tuple[str, str]]:
    """(method, split) pairs of stage ``label``: the test split with every method, the
    unlabelled pool with the teacher when ``generate.source`` takes it and the dataset has one."""
    jobs = [(m, "test") for m in methods(settings)]
    if settings.generate.source in ("pool", "both") and (Path(settings.data.out) / "unlabeled").is_dir():
        jobs.append((TEACHER, "unlabeled"))
    return jobs


def _images(settings: Settings, split: str) -> ReaderImages:
    return ReaderImages(DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index))


def _augmented(settings: Settings, split: str) -> tuple[bool, list[float] | None]:
    """Test-time augmentation (``evaluate.flip`` / ``evaluate.scales``) is for scoring: the
    test split only; the pool's labels are the plain prediction, as DDPM-Seg makes them."""
    e = settings.evaluate
    scales = e.scales if settings.data.resize == "slide" else None  # whole: every scale is the same input
    return (bool(e.flip), scales) if split == "test" else (False, None)


def soft_labels(settings: Settings, method: str, split: str) -> bool:
    """Whether a labelling also writes the soft labels (``<id>_probs.npy``): the teacher's
    labels of the pool with ``teacher.soft_labels``, what the export carries to the student."""
    return bool(settings.teacher.soft_labels) and method == TEACHER and split == "unlabeled"


def labels_id(settings: Settings, method: str, split: str, source: ReaderImages) -> str:
    """What a labelling's parts were made from: the teacher's file, then the images' content
    and how they met the model (parts of another teacher, of other images under the same ids,
    of another geometry, or without the soft labels now asked for are redone)."""
    from ddps_core.training import content_id

    flip, scales = _augmented(settings, split)
    how = {"resize": settings.data.resize, "stride": settings.data.stride, "flip": flip, "scales": scales,
           "images": source.content_id()}
    if soft_labels(settings, method, split):  # only then: labellings without them keep their id
        how["soft"] = True
    how = json.dumps(how, sort_keys=True)
    return f"{teacher_id(model_folder(settings, method) / WEIGHTS)}-{content_id([how.encode()])}"


def plan_labels(settings: Settings, n: int, report: Reporter) -> list[dict[str, Any]]:
    """Start every (method, split) labelling (parts of another teacher are dropped); the
    unfinished parts, in at most ``n`` groups per pair."""
    groups = []
    for method, split in label_jobs(settings):
        folder = label_folder(settings, method, split)
        source = _images(settings, split)
        made = labels_id(settings, method, split, source)
        if finished_labels(folder, made, source.image_ids) is not None:
            continue  # labelled by this teacher, from these images, this way: kept
        start_labels(folder, made)
        todo = pending_parts(source, folder)
        groups += [{"method": method, "split": split, "parts": todo[i::n]} for i in range(max(1, n)) if todo[i::n]]
    return groups


def label_group(settings: Settings, group: dict[str, Any], report: Reporter) -> int:
    """Label one group of :func:`plan_labels` (images, features, ensemble, PNGs: no feature
    store); the number of images predicted."""
    from ddps_core.inference.teacher import load_teacher_predictor

    method, split = group["method"], group["split"]
    flip, scales = _augmented(settings, split)
    predictor = load_teacher_predictor(settings, None, method, flip=flip, scales=scales,
                                       probs=soft_labels(settings, method, split))
    task = f"label {method}/{split}"
    return label_parts(predictor, _images(settings, split), label_folder(settings, method, split), split,
                       group["parts"], progress=lambda done, total: report.progress(task, done, total))


def _remove_stale_labels(settings: Settings, jobs: list[tuple[str, str]], ids: dict[tuple[str, str], list[str]]) -> None:
    """The labels folder holds this run's labels only: the files of images no longer in a
    split go, and so do the folders of (method, split) pairs the settings no longer label
    (only folders this stage made: they hold its ``teacher.txt`` record)."""
    for job in jobs:
        ends = (".png", "_uncertainty.png", *((PROBS,) if soft_labels(settings, *job) else ()))
        keep = {"scores.parquet", "teacher.txt", *(f"{i}{end}" for i in ids[job] for end in ends)}
        remove_stale(label_folder(settings, *job), keep)
    root = Path(settings.teacher.labels_out)
    for made in sorted(root.glob("*/*/teacher.txt")):
        method, split = made.parent.parent.name, made.parent.name
        if (method, split) not in jobs:
            shutil.rmtree(made.parent)
            if not any(made.parent.parent.iterdir()):
                made.parent.parent.rmdir()


def label(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Join each (method, split)'s parts into its ``scores.parquet``; then remove what the
    settings no longer label (:func:`_remove_stale_labels`)."""
    out = {}
    jobs = label_jobs(settings)
    ids: dict[tuple[str, str], list[str]] = {}
    for method, split in jobs:
        source = _images(settings, split)
        ids[(method, split)] = list(source.image_ids)
        folder, made = label_folder(settings, method, split), labels_id(settings, method, split, source)
        scores = finished_labels(folder, made, source.image_ids)
        if scores is None:
            scores = finish_labels(source, folder, made, _num_classes(settings))
        out[f"{method}/{split}"] = {"images": len(scores), "mean_score": float(scores["score"].mean())}
        report.log(f"{method}/{split}: {len(scores)} images labelled -> {label_folder(settings, method, split)}")
    _remove_stale_labels(settings, jobs, ids)
    if (TEACHER, "unlabeled") not in jobs:
        # the pool's folder exists either way (stage generate depends on it), saying why it is empty
        why = ("generate.source is 'generated'" if settings.generate.source == "generated"
               else f"the dataset has no unlabeled split ({Path(settings.data.out) / 'unlabeled'})")
        atomic_write_text(label_folder(settings, TEACHER, "unlabeled") / NO_POOL, f"the pool is not labelled: {why}\n")
    return out


LABEL = Stage("label", main=label, steps=(Step("parts", plan_labels, label_group),),
              products=lambda s: [s.teacher.labels_out])
