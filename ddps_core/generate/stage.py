"""Stage ``generate``: candidates from the pool and / or the DDPM, filtered, exported.

Sources (``generate.source``):

* ``pool``: the unlabelled images, with the labels and scores stage ``label`` wrote
  (``<teacher.labels_out>/teacher/unlabeled/``; the teacher recorded there must be the
  current one);
* ``generated``: ``generate.n_samples`` images sampled from the trained DDPM
  (:mod:`.sample`) and labelled by the teacher streaming (features, ensemble, labels; no
  feature store), under ``generate.work``. These are the stage's two fan-out steps (sampling
  per batch, labelling per part), each resumable;
* ``both``.

Each source is filtered on its own (:mod:`.filter`): the score distributions of real and
sampled images differ, so one rule over the union would mostly keep one source. The real
labelled training images are added unfiltered (``include_real``). :mod:`.export` writes the
result.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, GenericFolder, load_image, to_square
from ddps_core.errors import DataError
from ddps_core.generate.export import Candidate, export_dataset, summary
from ddps_core.generate.filter import filter_scores
from ddps_core.io import atomic_write_text
from ddps_core.progress import Reporter
from ddps_core.stages import Stage, Step

__all__ = ["GENERATE", "image_size", "pool_candidates", "real_candidates"]


def _teacher(settings: Settings) -> str:
    from ddps_core.teacher.labels import teacher_id
    from ddps_core.teacher.stage import WEIGHTS

    path = Path(settings.teacher.out) / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: no trained teacher; run the train_teacher stage")
    return teacher_id(path)


def image_size(settings: Settings) -> int:
    """The diffusion model's image size: every feature store, label and export uses it."""
    from ddps_core.diffusion.presets import get_preset

    return get_preset(settings.ddpm.preset).image_size


def _labels_loader(image_fn: Callable[[], np.ndarray], label_path: Path, size: int):
    """A pool image with its teacher label, at the label's size: the image as it is when the
    ``label`` stage labelled it at its own size; squared (``to_square``) when the label is the
    ``S x S`` map of the squared image. The student's and refiner's training then apply
    ``data.resize`` to the export."""
    def load() -> tuple[np.ndarray, np.ndarray]:
        from ddps_core.metrics.files import load_label_map

        image, label = image_fn(), load_label_map(label_path)
        if label.shape != image.shape[:2]:
            image, _ = to_square(image, None, size)
        return image, label

    return load


def _soft_loader(folder: Path, image_id: str):
    """An image's soft labels as the label stage wrote them (``<id>_probs.npy`` and its
    Jensen-Shannon map): ``(float16 [K, H, W], uint8 [H, W])``."""
    def load() -> tuple[np.ndarray, np.ndarray]:
        from ddps_core.metrics.files import load_label_map
        from ddps_core.teacher.labels import PROBS

        path = folder / f"{image_id}{PROBS}"
        try:
            probs = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: no readable soft labels ({exc}); teacher.soft_labels is true: rerun the "
                            "label stage") from None
        return probs, load_label_map(folder / f"{image_id}_uncertainty.png")

    return load


def pool_candidates(settings: Settings, teacher: str, size: int) -> list[Candidate]:
    """The unlabelled pool as labelled by the ``label`` stage."""
    folder = Path(settings.teacher.labels_out) / "teacher" / "unlabeled"
    scores_path, marker = folder / "scores.parquet", folder / "teacher.txt"
    if not scores_path.is_file():
        from ddps_core.teacher.stage import NO_POOL

        why = (folder / NO_POOL).read_text().strip() if (folder / NO_POOL).is_file() else "run the label stage"
        raise DataError(f"{scores_path}: the unlabelled pool has no teacher labels ({why}); generate.source "
                        f"{settings.generate.source!r} needs them (the dataset's unlabeled split: "
                        f"{Path(settings.data.out) / 'unlabeled'})")
    # the marker is "<teacher id>-<features content id>" (see teacher.stage): the teacher part decides
    if not marker.is_file() or marker.read_text().strip().partition("-")[0] != teacher:
        raise DataError(f"{folder}: labelled by another teacher than {settings.teacher.out}; "
                        "rerun the label stage")
    scores = pd.read_parquet(scores_path, columns=["image_id", "score"])
    reader = DDPMSegFolder(settings.data.out, "unlabeled", ignore_index=settings.data.ignore_index)
    index = {sid: i for i, sid in enumerate(reader.ids)}
    out = []
    for row in scores.itertuples():
        if row.image_id not in index:
            raise DataError(f"{scores_path}: image {row.image_id!r} is not in {reader.folder}; rerun the label stage")
        i = index[row.image_id]
        out.append(Candidate(
            image_id=f"pool_{row.image_id}", source="pool", source_id=row.image_id, score=float(row.score),
            load=_labels_loader(lambda i=i: reader[i].image, folder / f"{row.image_id}.png", size),
            teacher=teacher, soft=_soft_loader(folder, row.image_id) if settings.teacher.soft_labels else None))
    return out


def real_candidates(settings: Settings, size: int) -> list[Candidate]:
    """The real labelled training images, at their own size: the student's and the refiner's
    training apply ``data.resize`` to every image of the export. (``size`` is not used; kept for
    the callers.)"""
    reader = DDPMSegFolder(settings.data.out, "train", ignore_index=settings.data.ignore_index)

    def loader(i: int):
        def load() -> tuple[np.ndarray, np.ndarray]:
            sample = reader[i]
            return sample.image, sample.label
        return load

    return [Candidate(image_id=f"real_{sid}", source="real", source_id=sid, score=None, load=loader(i))
            for i, sid in enumerate(reader.ids)]


def _sampler(settings: Settings) -> dict[str, Any]:
    g = settings.generate
    return {"method": g.sample_method, "steps": g.sample_steps, "seed": g.seed}


def _reset_if_changed(work: Path, ident: dict[str, Any], report: Reporter) -> None:
    """Samples, their features and labels belong to one (model, sampler) setting."""
    marker = work / "samples.json"
    text = json.dumps(ident, sort_keys=True)
    if work.exists() and (not marker.is_file() or marker.read_text() != text):
        report.log(f"{work}: made with other sampler settings or another model; starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, text)


def _model_info(settings: Settings) -> dict[str, Any]:
    """The trained DDPM's record (model id, schedule), without loading its weights."""
    from ddps_core.diffusion.train import INFO_FILE

    from ddps_core.training import read_record

    return read_record(Path(settings.ddpm.out) / INFO_FILE, "no diffusion model here; run the train_ddpm stage first",
                       rerun="train_ddpm")


def _sample_ids(settings: Settings) -> list[str]:
    from ddps_core.generate.sample import sample_id

    return [sample_id(i) for i in range(settings.generate.n_samples)]


def _samples(settings: Settings) -> Path:
    return Path(settings.generate.work) / "samples"


def _labels(settings: Settings) -> Path:
    return Path(settings.generate.work) / "labels"


def _uses_samples(settings: Settings) -> bool:
    return settings.generate.source in ("generated", "both") and settings.generate.n_samples > 0


def _groups(todo: list[int], n: int) -> list[list[int]]:
    return [todo[i::n] for i in range(max(1, n)) if todo[i::n]]


def _samples_reader(settings: Settings, clean: bool = False) -> GenericFolder:
    """The sampled images as a dataset; ``clean`` removes stray files of an older, larger run."""
    k = DDPMSegFolder(settings.data.out, "train").num_classes
    ids, samples = _sample_ids(settings), _samples(settings)

    def read() -> GenericFolder:
        return GenericFolder(samples, num_classes=k, ignore_index=settings.data.ignore_index, require_labels=False)

    reader = read()
    if reader.ids != ids and clean:
        for sid in sorted(set(reader.ids) - set(ids)):
            (samples / "images" / f"{sid}.png").unlink()
        reader = read()
    if reader.ids != ids:
        missing = sorted(set(ids) - set(reader.ids))[:5]
        raise DataError(f"{samples / 'images'}: the samples are not all drawn (missing {missing}); "
                        "run the sampling step first")
    return reader


def _sample_images(settings: Settings) -> Any:
    from ddps_core.teacher.labels import ReaderImages

    return ReaderImages(_samples_reader(settings))


def _labels_made(settings: Settings) -> str:
    """What the samples' labels are made with: the teacher, and whether they keep soft labels."""
    return _teacher(settings) + ("-soft" if settings.teacher.soft_labels else "")


def _labels_done(settings: Settings) -> pd.DataFrame | None:
    from ddps_core.teacher.labels import finished_labels

    return finished_labels(_labels(settings), _labels_made(settings), _sample_ids(settings))


# --------------------------------------------------------------------------- the steps
def plan_sampling(settings: Settings, n: int, report: Reporter) -> list[list[int]]:
    """Step ``sample``: reset ``generate.work`` when the model or the sampler changed; the
    unfinished sampling batches, in at most ``n`` groups."""
    from ddps_core.generate.sample import pending_batches

    g = settings.generate
    if not _uses_samples(settings):
        return []
    ident = {"model_id": _model_info(settings)["model_id"], "batch_size": g.batch_size, **_sampler(settings)}
    _reset_if_changed(Path(g.work), ident, report)
    return _groups(pending_batches(_samples(settings) / "images", g.n_samples, g.batch_size), n)


def sample_batches(settings: Settings, batches: list[int], report: Reporter) -> int:
    """Draw one group of sampling batches."""
    import torch

    from ddps_core.device import resolve_device
    from ddps_core.diffusion.gaussian import GaussianDiffusion
    from ddps_core.diffusion.stage import load_trained
    from ddps_core.generate.sample import sample_to_folder

    g = settings.generate
    device = resolve_device(settings.device)
    model, info = load_trained(settings.ddpm.out, device)
    diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
    report.progress("sample", 0, g.n_samples)
    with torch.inference_mode():
        sample_to_folder(model, diffusion, _samples(settings) / "images", g.n_samples, batch_size=g.batch_size,
                         steps=g.sample_steps, method=g.sample_method, seed=g.seed, device=device,
                         progress=lambda d, n: report.progress("sample", d, n), batches=batches)
    return len(batches)


def plan_sample_labels(settings: Settings, n: int, report: Reporter) -> list[list[int]]:
    """Step ``label``: start labelling the samples with the teacher (streaming); the unfinished parts in
    at most ``n`` groups (none once they are labelled)."""
    from ddps_core.teacher.labels import pending_parts, start_labels

    if not _uses_samples(settings):
        return []
    _samples_reader(settings, clean=True)  # every sample drawn; strays of a larger earlier run removed
    if _labels_done(settings) is not None:
        return []
    start_labels(_labels(settings), _labels_made(settings))
    return _groups(pending_parts(_sample_images(settings), _labels(settings)), n)


def label_sample_parts(settings: Settings, parts: list[int], report: Reporter) -> int:
    """Label one group of the samples' parts; images predicted."""
    from ddps_core.inference.teacher import load_teacher_predictor
    from ddps_core.teacher.labels import label_parts

    predictor = load_teacher_predictor(settings, probs=settings.teacher.soft_labels)
    return label_parts(predictor, _sample_images(settings), _labels(settings),
                       "generated", parts, progress=lambda d, n: report.progress("label samples", d, n))


# --------------------------------------------------------------------------- main
def _sample_scores(settings: Settings) -> pd.DataFrame:
    """The samples' ``scores.parquet``, written once every part is labelled."""
    from ddps_core.teacher.labels import finish_labels

    scores = _labels_done(settings)
    if scores is None:
        k = DDPMSegFolder(settings.data.out, "train").num_classes
        scores = finish_labels(_sample_images(settings), _labels(settings), _labels_made(settings), k)
    return scores


def generated_candidates(settings: Settings, teacher: str) -> list[Candidate]:
    """The sampled images with their teacher labels (every step done)."""
    by_id = dict(zip(*(_sample_scores(settings)[c] for c in ("image_id", "score"))))
    samples, labels, size = _samples(settings), _labels(settings), image_size(settings)
    return [Candidate(image_id=sid, source="generated", source_id=sid, score=float(by_id[sid]),
                      load=_labels_loader(lambda p=samples / "images" / f"{sid}.png": load_image(p),
                                          labels / f"{sid}.png", size),
                      sampler=_sampler(settings), teacher=teacher,
                      soft=_soft_loader(labels, sid) if settings.teacher.soft_labels else None)
            for sid in _sample_ids(settings)]


def generate(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Filter each source's candidates on its own, add the real labelled images, export.
    Returns the filtering statistics per source (also ``<out>/summary.json``)."""
    g = settings.generate
    teacher = _teacher(settings)
    size = image_size(settings)
    reader = DDPMSegFolder(settings.data.out, "train")
    names = list(reader.class_names) if reader.class_names else [str(c) for c in range(reader.num_classes)]
    scored: list[Candidate] = []
    if g.source in ("pool", "both"):
        scored += pool_candidates(settings, teacher, size)
    if _uses_samples(settings):
        scored += generated_candidates(settings, teacher)
    if not scored:
        raise DataError(f"generate.source {g.source!r} produced no candidates (generate.n_samples is 0?)")
    frames = []
    for source in dict.fromkeys(c.source for c in scored):
        part = [c for c in scored if c.source == source]
        decided = filter_scores([c.score for c in part], [c.image_id for c in part], g)
        if not decided["kept"].any():
            why = (f" (the reference rule keeps nothing of fewer than {math.ceil((g.drop_certain + 1) / g.drop_uncertain)}"
                   " candidates with these settings; generate.filter: drop_both keeps some)"
                   if g.filter == "reference" and g.drop_uncertain > 0 else "")
            report.log(f"warning: generate.filter {g.filter!r} keeps none of the {len(part)} {source} images{why}")
        frames.append(decided)
    decisions = pd.concat(frames, ignore_index=True)
    candidates = scored + (real_candidates(settings, size) if g.include_real else [])
    ident = json.dumps({"generate": g.model_dump(mode="json"), "teacher": teacher,
                        "soft": settings.teacher.soft_labels}, sort_keys=True)
    manifest = export_dataset(g.out, candidates, decisions, names, ignore_index=settings.data.ignore_index,
                              ddpm_seg=g.format == "ddpm-seg", contact=g.contact_sheet, settings_text=ident,
                              progress=lambda d, n: report.progress("export", d, n))
    stats = summary(manifest)
    for source, s in stats.items():
        if isinstance(s, dict):
            report.log(f"{source}: {s['kept']}/{s['candidates']} kept, dropped {s['dropped']}")
    report.log(f"exported {stats['total_kept']} labelled images to {g.out}")
    return stats


GENERATE = Stage("generate", main=generate, products=lambda s: [s.generate.out], steps=(
    Step("sample", plan_sampling, sample_batches),
    Step("label", plan_sample_labels, label_sample_parts),
))
