"""Stage ``train_student``, and the student's predictions of a real split.

The student trains on ``student.source``:

* ``generated``: the ``generate`` stage's export (``<generate.out>``: ``images/`` + ``masks/``,
  read with :class:`~ddps_core.datasets.GenericFolder`; the real labelled images are in it when
  ``generate.include_real``), each image as ``data.resize`` makes it an ``S x S`` entry (or its
  windows) at ``student.image_size`` (default: the diffusion model's size), and is selected by
  mIoU on the real labelled training images, taken the same way (the reference's rule);
* ``labelled``: the dataset's own labelled training split (``<data.out>/real/train``) at its own
  resolution, as random crops (:mod:`ddps_core.student.labelled`); the last weights are kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, GenericFolder
from ddps_core.datasets.training import TrainingView
from ddps_core.device import resolve_device, torch_threads
from ddps_core.errors import DataError
from ddps_core.progress import Reporter
from ddps_core.stages import Stage
from ddps_core.student import train as training
from ddps_core.student.labelled import LabelledCrops
from ddps_core.student.train import ImageSet, SoftTargets

__all__ = ["TRAIN_STUDENT", "export_size", "predict_split", "soft_targets", "training_data"]


def _export(settings: Settings) -> tuple[GenericFolder, Path]:
    root = Path(settings.generate.out)
    manifest = root / "manifest.parquet"
    if not manifest.is_file():
        raise DataError(f"{manifest}: no generated dataset; run the generate stage first")
    return GenericFolder(root, ignore_index=settings.data.ignore_index), manifest


def export_size(reader: GenericFolder) -> int:
    """Side of the export's first image."""
    return int(reader[0].image.shape[0])


def _model_size(settings: Settings) -> int:
    from ddps_core.diffusion.presets import get_preset

    return int(get_preset(settings.ddpm.preset).image_size)


def student_size(settings: Settings) -> int:
    """The side of the student's ``S x S`` entries and predictions: ``student.image_size``, else
    the diffusion model's."""
    return int(settings.student.image_size or _model_size(settings))


def training_data(settings: Settings) -> dict[str, Any]:
    """What stage ``train_student`` trains and selects on for ``student.source``:
    ``{"train", "val", "inputs", "num_classes", "class_names"}`` and, for source generated,
    ``"soft"``: the distillation targets with ``student.distill: soft``, else None."""
    cfg, d = settings.student, settings.data
    size = student_size(settings)
    real = DDPMSegFolder(d.out, "train", ignore_index=d.ignore_index)
    if cfg.source == "labelled":
        train = LabelledCrops(real, cfg.crop_size, base_scale=cfg.base_scale, ratio_range=cfg.ratio_range,
                              cat_max_ratio=cfg.cat_max_ratio, hflip=cfg.hflip, ignore_index=d.ignore_index,
                              size=size)
        return {"train": train, "val": None, "inputs": {"train": real.content_id()},
                "num_classes": real.num_classes, "class_names": real.class_names}
    reader, manifest = _export(settings)
    data_id = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    inputs = {"train": data_id} if d.resize == "whole" and d.stride is None else \
        {"train": data_id, "resize": f"{d.resize}/{d.stride}"}  # whole keeps the identity runs had
    return {"train": ImageSet(TrainingView(reader, size, d.resize, d.stride), size),
            "val": ImageSet(TrainingView(real, size, d.resize, d.stride), size), "inputs": inputs,
            "num_classes": reader.num_classes, "class_names": reader.class_names,
            "soft": soft_targets(settings, reader.num_classes) if cfg.distill == "soft" else None}


def soft_targets(settings: Settings, num_classes: int) -> SoftTargets:
    """The export's soft labels (``soft/`` of its manifest's kept rows) as distillation targets."""
    import pandas as pd

    root = Path(settings.generate.out)
    manifest = pd.read_parquet(root / "manifest.parquet")
    if "soft" not in manifest.columns or not manifest["soft"].notna().any():
        raise DataError(f"{root / 'manifest.parquet'}: the export has no soft labels, which student.distill 'soft' "
                        "trains on; rerun the label and generate stages with teacher.soft_labels true")
    from ddps_core.generate.export import soft_files

    ids = manifest.loc[manifest["kept"] & manifest["soft"].notna(), "image_id"]
    soft = {i: tuple(root / f for f in soft_files(i)) for i in ids}
    return SoftTargets(soft, num_classes, settings.data.ignore_index, settings.student.uncertainty_weight)


def train_student(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``train_student``: train (or resume) and select the student, then predict the
    real test split into ``<student.out>/test/<id>.png``, each at the image's own size (what
    ``evaluate`` scores; :func:`predict_split`)."""
    cfg = settings.student
    data = training_data(settings)
    report.progress("student", 0, None)
    with torch_threads(cfg.threads):
        info = training.train_student(
            cfg, data["train"], data["val"], num_classes=data["num_classes"], ignore_index=settings.data.ignore_index,
            class_names=data["class_names"], device=resolve_device(settings.device), inputs=data["inputs"],
            report=report, image_size=student_size(settings), soft=data.get("soft"))
    result = predict_split(settings, "test", Path(cfg.out) / "test",
                           progress=lambda d, n: report.progress("predict test", d, n))
    report.log(f"student {info['arch']}/{info['encoder']} ({cfg.source}): epoch {info['best_epoch']} selected; "
               f"test mIoU {100 * result.miou:.2f}, mBIoU {100 * result.mbiou:.2f} -> {cfg.out}")
    return {**info, "test_miou": float(result.miou), "test_mbiou": float(result.mbiou),
            "test_mode": settings.data.resize, "test_size": int(info["image_size"])}


TRAIN_STUDENT = Stage("train_student", main=train_student, products=lambda s: [s.student.out])


def predict_split(settings: Settings, split: str, folder: str | Path,
                  progress: Callable[[int, int], None] | None = None) -> Any:
    """Label every image of a real ``split`` with the trained student into ``folder``
    (``<id>.png``), each at the image's own size
    (:class:`~ddps_core.inference.student.StudentPredictor`: ``data.resize`` / ``data.stride``,
    test-time ``evaluate.flip`` / ``evaluate.scales``). Returns the metrics against the split's
    own labels, at their resolution, when it has labels."""
    from ddps_core.datasets.common import png_bytes
    from ddps_core.inference.student import load_student_predictor
    from ddps_core.io import atomic_write_bytes
    from ddps_core.metrics import ConfusionAccumulator

    ev = settings.evaluate
    predictor = load_student_predictor(settings, resolve_device(settings.device), flip=ev.flip, scales=ev.scales)
    reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acc = ConfusionAccumulator(predictor.num_classes, ignore_index=settings.data.ignore_index,
                               boundary_ratio=ev.boundary_ratio) if reader.has_labels else None
    n, batch = len(reader), 64
    with torch_threads(settings.student.threads):
        for a in range(0, n, batch):
            samples = [reader[k] for k in range(a, min(n, a + batch))]
            for sample, labels in zip(samples, predictor.labels([x.image for x in samples]), strict=True):
                atomic_write_bytes(folder / f"{sample.id}.png", png_bytes(labels))
                if acc is not None:
                    acc.update(labels, sample.label, sample.id)
            if progress is not None:
                progress(a + len(samples), n)
    return acc.result() if acc is not None else None
