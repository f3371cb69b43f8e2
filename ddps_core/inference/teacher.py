"""The teacher (and its baselines) as a :class:`~ddps_core.inference.Predictor`: images of any
size in, labels and the Jensen-Shannon uncertainty at each image's size out, with no feature
store in between.

Each ``S x S`` model input (:mod:`ddps_core.inference.windows`) goes through the feature
extractor, the ensemble votes pixel by pixel (:func:`~ddps_core.teacher.predict.vote_maps`),
and the vote shares and the uncertainty are merged over the windows and resized to the image.
The label is the argmax of the merged shares: at an image of ``S x S`` in ``whole`` mode that
is exactly the members' majority vote of DDPM-Seg. The features are rounded to float16 first,
as the feature store holds them, so streaming and stored features label alike.

The baselines use the same path with other features: ``random_unet`` a random UNet's,
``rgbxy`` the window's own RGB and (x, y).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ddps_core.errors import DataError
from ddps_core.inference import Prediction
from ddps_core.inference.windows import image_groups, image_maps, labels_of
from ddps_core.teacher.ensemble import PixelEnsemble
from ddps_core.teacher.predict import image_score, vote_maps

__all__ = ["TeacherPredictor", "ddpm_window_features", "load_teacher_predictor", "rgbxy_window_features"]

#: Bytes of merged maps (vote shares and uncertainty) held at once.
MAP_BUDGET = 1 << 30

#: ``uint8 [n, S, S, 3]`` windows -> per window a ``[D, S, S]`` array or a ``(ys, xs) -> [n, D]`` callable.
WindowFeatures = Callable[[np.ndarray], Sequence[Any]]


def ddpm_window_features(extractor: Any) -> WindowFeatures:
    """The DDPM-Seg features of windows: one forward per batch, each window's maps kept at
    their native resolution (rounded to float16 like the store's) and upsampled to ``S x S``
    pixel by pixel, so the ``D x S x S`` map never exists."""
    from ddps_core.features.store import upsample_pixels

    S = extractor.image_size
    names = list(extractor.names)

    def features(windows: np.ndarray) -> list[Callable[[np.ndarray, np.ndarray], np.ndarray]]:
        x = torch.from_numpy(np.array(windows)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        with torch.inference_mode():
            maps = extractor(x)
        natives = [{n: maps[n][b].to(torch.float16).float().numpy() for n in names} for b in range(len(windows))]

        def taps(native: dict[str, np.ndarray]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
            def pixels(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
                return np.concatenate([upsample_pixels(native[n], S, ys, xs) for n in names], axis=1)
            return pixels

        return [taps(native) for native in natives]

    return features


def rgbxy_window_features(windows: np.ndarray) -> list[np.ndarray]:
    """The ``rgbxy`` baseline's features of each window (``[5, S, S]``)."""
    from ddps_core.teacher.sources import rgbxy_features

    return [rgbxy_features(w) for w in windows]


class TeacherPredictor:
    """A trained ensemble on features of ``S x S`` windows (see the module text).

    :param window_features: see :data:`WindowFeatures`.
    :param batch: windows per feature forward.
    """

    def __init__(self, ensemble: PixelEnsemble, window_features: WindowFeatures, size: int, *, model: str = "teacher",
                 model_id: str = "", class_names: list[str] | None = None, mode: str = "whole",
                 stride: int | None = None, batch: int = 16, flip: bool = False,
                 scales: Sequence[float] | None = None, chunk: int | None = None, probs: bool = False):
        self.ensemble = ensemble.eval()
        self.probs = bool(probs)  # also the members' mean softmax (Prediction.probs)
        self.window_features = window_features
        self.model, self.model_id, self.size = model, model_id, int(size)
        self.num_classes = int(ensemble.num_classes)
        self.class_names = class_names
        self.mode, self.stride, self.batch = mode, stride, int(batch)
        self.flip, self.scales, self.chunk = bool(flip), scales, chunk

    @property
    def uncertainty_max(self) -> float:
        """The largest Jensen-Shannon divergence of ``M`` members: ``ln M`` (1 for one member)."""
        return math.log(self.ensemble.members) if self.ensemble.members > 1 else 1.0

    def _window_maps(self, windows: np.ndarray) -> torch.Tensor:
        maps = []
        for features in self.window_features(windows):
            shares, js, *mean = vote_maps(self.ensemble, features, self.chunk, self.size, mean_probs=self.probs)
            maps.append(torch.cat([shares, js[None], *mean]))
        return torch.stack(maps)

    def __call__(self, images: list[np.ndarray]) -> list[Prediction]:
        # the maps of a group's windows are held until its images are merged: groups of at most
        # MAP_BUDGET bytes of them (a function of the images' sizes and the settings)
        k = self.num_classes
        per_window = ((2 if self.probs else 1) * k + 1) * self.size * self.size * 4
        windows = max(self.batch, MAP_BUDGET // per_window)
        out = []
        for group in image_groups([im.shape[:2] for im in images], self.size, self.mode, self.stride, windows,
                                  self.flip, self.scales):
            for maps in image_maps([images[k] for k in group], self._window_maps, self.size, self.mode,
                                   self.stride, self.batch, self.flip, self.scales):
                unc = maps[k].numpy()
                probs = maps[k + 1:].numpy() if self.probs else None
                out.append(Prediction(labels_of(maps, k), unc, image_score(unc), probs))
        return out


def load_teacher_predictor(settings: Any, device: Any = None, method: str = "teacher", flip: bool = False,
                           scales: Sequence[float] | None = None, probs: bool = False) -> TeacherPredictor:
    """The trained ``method`` of a workspace (``teacher``, ``random_unet`` or ``rgbxy``) under
    ``data.resize`` / ``data.stride``; with ``probs`` its predictions carry the members' mean
    softmax. An ensemble trained on other features than the settings make now (another DDPM,
    ``features.*``) is refused."""
    from ddps_core.datasets import DDPMSegFolder
    from ddps_core.device import resolve_device
    from ddps_core.features.stage import extractor, model_size
    from ddps_core.features.store import FORMAT_VERSION
    from ddps_core.teacher.ensemble import features_id
    from ddps_core.teacher.labels import teacher_id
    from ddps_core.teacher.stage import WEIGHTS, load_method, model_folder

    device = resolve_device(str(settings.device if device is None else device))
    ensemble = load_method(settings, method).to(device)
    size = model_size(settings)
    if method == "rgbxy":
        features, made = rgbxy_window_features, f"rgbxy-{size}"
    else:
        ext = extractor(settings, device, "ddpm" if method == "teacher" else method)
        features, made = ddpm_window_features(ext), features_id({**ext.store_settings(), "format_version": FORMAT_VERSION})
    if ensemble.source_id is not None and ensemble.source_id != made:
        raise DataError(f"{model_folder(settings, method) / WEIGHTS}: the {method} was trained on other features "
                        f"({ensemble.source_id}) than the settings make now ({made}: another diffusion model or "
                        "features.* changed); rerun the train_teacher stage")
    names = DDPMSegFolder(settings.data.out, "train").class_names
    return TeacherPredictor(ensemble, features, size, model=method,
                            model_id=teacher_id(model_folder(settings, method) / WEIGHTS),
                            class_names=list(names) if names else None, mode=settings.data.resize,
                            stride=settings.data.stride, batch=settings.features.batch_size, flip=flip, scales=scales,
                            probs=probs)
