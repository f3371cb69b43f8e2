"""Stage ``train_student``, and the student's predictions of a real split.

The student trains on the ``generate`` stage's export (``<generate.out>``: ``images/`` +
``masks/``, read with :class:`~ddps_core.datasets.GenericFolder`; the real labelled images
are in it when ``generate.include_real``), at the export's image size unless
``student.image_size`` says otherwise, and is selected by mIoU on the real labelled training
images (the reference's rule).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, GenericFolder
from ddps_core.device import resolve_device, torch_threads
from ddps_core.errors import DataError
from ddps_core.progress import Reporter
from ddps_core.stages import Stage
from ddps_core.student import train as training
from ddps_core.student.train import ImageSet

__all__ = ["TRAIN_STUDENT", "export_size", "predict_split"]


def _export(settings: Settings) -> tuple[GenericFolder, Path]:
    root = Path(settings.generate.out)
    manifest = root / "manifest.parquet"
    if not manifest.is_file():
        raise DataError(f"{manifest}: no generated dataset; run the generate stage first")
    return GenericFolder(root, ignore_index=settings.data.ignore_index), manifest


def export_size(reader: GenericFolder) -> int:
    """Side of the export's (square) images."""
    return int(reader[0].image.shape[0])


def train_student(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``train_student``: train (or resume) and select the student, then predict the
    real test split into ``<student.out>/test/<id>.png`` (what ``evaluate`` scores)."""
    cfg = settings.student
    reader, manifest = _export(settings)
    size = export_size(reader)
    real = DDPMSegFolder(settings.data.out, "train", ignore_index=settings.data.ignore_index)
    data_id = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    report.progress("student", 0, None)
    with torch_threads(cfg.threads):
        info = training.train_student(
            cfg, ImageSet(reader, cfg.image_size or size), ImageSet(real, cfg.image_size or size),
            num_classes=reader.num_classes, ignore_index=settings.data.ignore_index, class_names=reader.class_names,
            device=resolve_device(settings.device), inputs={"train": data_id}, report=report)
    result = predict_split(settings, "test", Path(cfg.out) / "test", size,
                           progress=lambda d, n: report.progress("predict test", d, n))
    report.log(f"student {info['arch']}/{info['encoder']}: epoch {info['best_epoch']} selected; test mIoU "
               f"{100 * result.miou:.2f}, mBIoU {100 * result.mbiou:.2f} -> {cfg.out}")
    return {**info, "test_miou": float(result.miou), "test_mbiou": float(result.mbiou)}


TRAIN_STUDENT = Stage("train_student", main=train_student, products=lambda s: [s.student.out])


def predict_split(settings: Settings, split: str, folder: str | Path, size: int,
                  progress: Callable[[int, int], None] | None = None) -> Any:
    """Label every image of a real ``split`` with the trained student into ``folder``
    (``<id>.png``), at ``size`` (the teacher's: images and labels squared like the feature
    stores'; the student sees the images at its own size). Returns the metrics when the
    split has labels."""
    import numpy as np

    from ddps_core.datasets.common import png_bytes
    from ddps_core.io import atomic_write_bytes
    from ddps_core.metrics import ConfusionAccumulator
    from ddps_core.student.model import load_student
    from ddps_core.student.train import predict_labels

    device = resolve_device(settings.device)
    model, info = load_student(settings.student.out, device)
    reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
    data = ImageSet(reader, size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acc = ConfusionAccumulator(info["num_classes"], ignore_index=settings.data.ignore_index,
                               boundary_ratio=settings.evaluate.boundary_ratio) if reader.has_labels else None
    batch = 64
    with torch_threads(settings.student.threads):
        for a in range(0, len(data), batch):
            idx = list(range(a, min(len(data), a + batch)))
            images, labels = data.batch(idx) if acc is not None else (_images(data, idx), None)
            pred = predict_labels(model, images, batch, device, info["image_size"]).numpy().astype(np.uint8)
            for j, i in enumerate(idx):
                atomic_write_bytes(folder / f"{data.ids[i]}.png", png_bytes(pred[j]))
                if acc is not None:
                    acc.update(pred[j], labels[j].numpy(), data.ids[i])
            if progress is not None:
                progress(idx[-1] + 1, len(data))
    return acc.result() if acc is not None else None


def _images(data: ImageSet, idx: list[int]) -> Any:
    import numpy as np
    import torch

    from ddps_core.datasets import to_square

    imgs = [to_square(data.reader[i].image, None, data.size)[0] for i in idx]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
