"""The student's predictions on images of any size, at their own size.

:class:`StudentPredictor` runs the trained student on the ``S x S`` model inputs of each image
(``S``: the student's ``image_size``; ``data.resize`` ``whole`` or ``slide`` windows at
``data.stride``), takes the softmax of its logits, and merges the windows' class probabilities
back to the image's size with :func:`~ddps_core.inference.windows.image_maps` (the mean where
windows overlap, bilinear to ``H x W``, optional flip / multi-scale test-time augmentation); the
labels are their argmax. Stage ``train_student`` scores the test split with it
(:func:`ddps_core.student.stage.predict_split`), stage ``refine`` its ``student`` rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ddps_core.inference import Prediction
from ddps_core.inference.windows import image_groups, image_maps, labels_of

__all__ = ["StudentPredictor", "load_student_predictor", "student_windows"]

#: Student windows per forward (and per :func:`image_maps` call).
STUDENT_BATCH = 16


def student_windows(student: torch.nn.Module, device: torch.device | str) -> Any:
    """``uint8 [n, S, S, 3]`` windows -> float ``[n, K, S, S]`` softmax probabilities (CPU)."""
    from ddps_core.device import autocast

    device = torch.device(device)

    def window_fn(windows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(windows).to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode(), autocast(device):
            logits = student(x).float()
        return torch.softmax(logits, dim=1).cpu()

    return window_fn


class StudentPredictor:
    """The student as a :class:`~ddps_core.inference.Predictor` (see the module text)."""

    model = "student"

    def __init__(self, student: torch.nn.Module, *, model_id: str, num_classes: int, size: int,
                 class_names: list[str] | None = None, device: torch.device | str = "cpu", mode: str = "whole",
                 stride: int | None = None, flip: bool = False, scales: Sequence[float] | None = None,
                 batch: int = STUDENT_BATCH):
        self.student, self.model_id = student, str(model_id)
        self.num_classes, self.size, self.class_names = int(num_classes), int(size), class_names
        self.device = torch.device(device)
        self.mode, self.stride = mode, stride
        self.flip, self.scales = bool(flip), (list(scales) if scales else None)
        self.batch = int(batch)
        self._window_fn = student_windows(student, self.device)

    def probabilities(self, images: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """float ``[K, H, W]`` class probabilities of each image, at its size, in order."""
        for group in image_groups([im.shape[:2] for im in images], self.size, self.mode, self.stride,
                                  self.batch, self.flip, self.scales):
            yield from image_maps([images[k] for k in group], self._window_fn, self.size, self.mode, self.stride,
                                  self.batch, self.flip, self.scales)

    def labels(self, images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        """``H x W`` class ids of each image (argmax of :meth:`probabilities`)."""
        for probs in self.probabilities(images):
            yield labels_of(probs, self.num_classes)

    def __call__(self, images: list[np.ndarray]) -> list[Prediction]:
        return [Prediction(labels=labels, uncertainty=None, score=float("nan")) for labels in self.labels(images)]


def load_student_predictor(settings: Any, device: torch.device | str | None = None, flip: bool = False,
                           scales: Sequence[float] | None = None) -> StudentPredictor:
    """The trained student of ``settings.student.out`` at its own input size, tiling images as
    ``data.resize`` / ``data.stride`` say (``device`` None: ``settings.device``)."""
    from ddps_core.device import resolve_device
    from ddps_core.student.model import load_student, weights_id

    device = resolve_device(str(settings.device if device is None else device))
    model, info = load_student(settings.student.out, device)
    names = info.get("class_names")
    return StudentPredictor(model, model_id=weights_id(settings.student.out), num_classes=int(info["num_classes"]),
                            size=int(info["image_size"]), class_names=list(names) if names else None, device=device,
                            mode=settings.data.resize, stride=settings.data.stride, flip=flip, scales=scales)
