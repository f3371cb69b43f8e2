"""Predictions on images of any size, at their own size, from any trained model of a
workspace: the teacher (DDPM features and the pixel-MLP ensemble), the student (a segmentor)
or the refiner (the student refined by the DDPS head).

Every model works on ``S x S`` inputs; :mod:`ddps_core.geometry` maps an image to those
inputs (``data.resize``: ``whole`` or ``slide``) and the class probabilities back to the
image's size. A :class:`Predictor` is what every caller uses: the label stage, the scoring of
every method, ``ddps predict`` and the Python API.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ddps_core.errors import ConfigError

__all__ = ["MODELS", "Prediction", "Predictor", "load_predictor"]

#: The models a workspace can predict with.
MODELS = ("teacher", "student", "refiner")


@dataclass
class Prediction:
    """One image's prediction, at the image's own ``H x W``."""

    labels: np.ndarray
    """``H x W`` class ids (uint8 for up to 256 classes, else uint16)."""
    uncertainty: np.ndarray | None
    """float32 ``H x W``: the teacher's Jensen-Shannon divergence between its members, the
    refiner's share of refinement steps that changed the pixel; None for the student."""
    score: float
    """The image's uncertainty score (the teacher's: the mean of its top-``int(n/10)`` pixel
    scores, as the reference filter ranks images; the others: the mean of ``uncertainty``,
    NaN without one)."""
    probs: np.ndarray | None = None
    """float32 ``[K, H, W]``: the teacher's members' mean softmax when it was asked for
    (``teacher.soft_labels``: the soft labels a student distils from); else None."""


@runtime_checkable
class Predictor(Protocol):
    """A trained model that labels images of any size (see the module docstring)."""

    model: str
    """One of :data:`MODELS`."""
    model_id: str
    """Content id of the weights (changes when they do)."""
    num_classes: int
    class_names: list[str] | None
    size: int
    """``S``: the model's input size."""

    def __call__(self, images: list[np.ndarray]) -> list[Prediction]:
        """uint8 ``H x W x 3`` images of any sizes, batched internally; one
        :class:`Prediction` per image, at its size."""
        ...


def load_predictor(settings: Any, model: str, device: Any = None, flip: bool = False,
                   scales: Sequence[float] | None = None) -> Predictor:
    """The trained ``model`` of a workspace (one of :data:`MODELS`, or a teacher baseline:
    ``random_unet``, ``rgbxy``) as a :class:`Predictor` on ``device`` (default:
    ``settings.device``), with optional flip / multi-scale test-time augmentation."""
    if model == "student":
        from ddps_core.inference.student import load_student_predictor

        return load_student_predictor(settings, device, flip=flip, scales=scales)
    if model == "refiner":
        from ddps_core.inference.refiner import load_refiner_predictor

        return load_refiner_predictor(settings, device, flip=flip, scales=scales)
    if model in ("teacher", "random_unet", "rgbxy"):
        from ddps_core.inference.teacher import load_teacher_predictor

        return load_teacher_predictor(settings, device, model, flip=flip, scales=scales)
    raise ConfigError(f"model {model!r}: expected one of {list(MODELS)} (or a teacher baseline: random_unet, rgbxy)")
