"""The Python API: a trained model of a workspace in one call.

```python
import ddps

seg = ddps.load("path/to/workspace", model="refiner", device="cpu")
mask = seg(image)            # numpy H x W class ids, at the image's size
pred = seg.predict(image)    # the full Prediction: labels, uncertainty (or None), score
seg.class_names
```

A workspace is a project folder: its ``params.yaml`` (or ``params=``) and the trained models
under the folders it names; relative paths in it are relative to the workspace. An image is a
numpy array (``H x W x 3`` uint8 RGB, ``H x W`` uint8 or uint16 grayscale, ``H x W x 4``
RGBA), a PIL image or a file path, converted to RGB by the rule of
:func:`ddps_core.datasets.common.to_rgb` (the one ``ddps predict`` uses). The model runs
through the same :class:`~ddps_core.inference.Predictor` as ``ddps predict``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ddps_core.config import Settings
    from ddps_core.inference import Prediction, Predictor

__all__ = ["Segmenter", "load"]

def _rgb(image: Any) -> np.ndarray:
    from PIL import Image

    from ddps_core.datasets.common import load_image, to_rgb

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, (np.ndarray, Image.Image)):
        return to_rgb(image)
    raise TypeError(f"expected a numpy array, a PIL image or a file path, got {type(image).__name__}")


class Segmenter:
    """A trained model of a workspace (see the module text); made by :func:`load`."""

    def __init__(self, predictor: Predictor, settings: Settings | None = None):
        self.predictor = predictor
        self.settings = settings

    @property
    def model(self) -> str:
        """``teacher``, ``student`` or ``refiner``."""
        return self.predictor.model

    @property
    def model_id(self) -> str:
        """Content id of the weights."""
        return self.predictor.model_id

    @property
    def num_classes(self) -> int:
        return int(self.predictor.num_classes)

    @property
    def class_names(self) -> list[str]:
        """The model's class names, or ``class <id>`` for each class when it has none."""
        names = self.predictor.class_names
        return list(names) if names else [f"class {c}" for c in range(self.num_classes)]

    def predict(self, image: Any) -> Prediction:
        """The full :class:`~ddps_core.inference.Prediction` of one image (labels at its size,
        uncertainty or None, score)."""
        return self.predictor([_rgb(image)])[0]

    def predict_many(self, images: Sequence[Any]) -> list[Prediction]:
        """:meth:`predict` of several images, handed to the model together."""
        return list(self.predictor([_rgb(im) for im in images]))

    def __call__(self, image: Any) -> np.ndarray:
        """The mask of one image: ``H x W`` class ids at its size (uint8 up to 256 classes)."""
        return np.asarray(self.predict(image).labels)

    def __repr__(self) -> str:
        return f"Segmenter({self.model}, {self.model_id}, {self.num_classes} classes)"


def load(workspace: str | os.PathLike[str] = ".", model: str = "student", device: str | None = None,
         params: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Segmenter:
    """The trained ``model`` (``teacher``, ``student`` or ``refiner``) of ``workspace`` on
    ``device`` (``cpu``, ``cuda``, ``auto``; default: the workspace's ``device`` setting).
    ``params``: another settings file; ``overrides``: settings to change, as ``ddps --set``
    takes them (``{"data.resize": "slide"}``). A missing model is a
    :class:`~ddps_core.errors.DDPSError` naming the stage that trains it."""
    from ddps_core.predict import run

    run.check_model(model)
    settings = run.workspace_settings(workspace, params, {**(overrides or {}), "device": device})
    return Segmenter(run._load(settings, model, device=settings.device), settings)
