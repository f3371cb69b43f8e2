"""The refiner's predictions on images of any size, at their own size: one implementation for
stage ``refine`` and every other caller.

Per ``S x S`` model input (``S``: the student's ``image_size``; ``data.resize`` ``whole`` or
``slide`` windows), the frozen student gives its decoder features and Free-Re-noising
(:func:`~ddps_core.refiner.sample.free_renoising`: ``refiner.refine_steps``,
``refiner.guidance``) refines them; each requested step's mask is one-hot encoded and merged over
the windows with :func:`~ddps_core.inference.windows.image_maps` (the mean where windows overlap,
bilinear to ``H x W``), and its argmax is that step's labels. The uncertainty is the share of
the run steps after the first whose mask changed the pixel (vs the previous run step), merged
the same way; the image's score is its mean.

Randomness: each image's draws (its windows' initial masks and re-noising) come from a
generator on the device seeded with ``refiner.seed`` and the image's pixels
(:func:`image_seed`), so an image gets the same labels whatever other images it is predicted
with, in whatever order and batches (``ddps predict`` and stage ``refine`` agree), on any
machine of the same device kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddps_core.inference import Prediction
from ddps_core.inference.windows import image_maps, labels_of

__all__ = ["MAP_BUDGET", "REFINE_BATCH", "RefinerPredictor", "image_seed", "load_refiner_predictor", "refiner_predictors"]

#: Windows per denoiser batch, at most (fixed: the random draws depend on it).
REFINE_BATCH = 64
#: Bytes of merged maps (one-hot masks of the requested steps) held for one batch of windows:
#: fewer windows per batch for many classes or steps (a function of the settings, not the machine).
MAP_BUDGET = 1 << 30


def image_seed(seed: int, image: np.ndarray) -> int:
    """A 63-bit seed from ``seed`` and an image's shape and pixels (sha256)."""
    import hashlib

    h = hashlib.sha256(f"{int(seed)} {tuple(image.shape)} {image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


class RefinerPredictor:
    """The student refined by a DDPS denoiser as a :class:`~ddps_core.inference.Predictor`
    (see the module text). ``steps``: the network steps run; ``report_steps``: the steps
    :meth:`step_labels` gives by default (the last run step is the prediction)."""

    model = "refiner"

    def __init__(self, student: torch.nn.Module, denoiser: torch.nn.Module, schedule: Any, *, model_id: str,
                 num_classes: int, size: int, steps: Sequence[int], report_steps: Sequence[int] | None = None,
                 guidance: float = 0.0, guidance_from: str = "every", seed: int = 0,
                 class_names: list[str] | None = None,
                 device: torch.device | str = "cpu", mode: str = "whole", stride: int | None = None,
                 flip: bool = False, scales: Sequence[float] | None = None, batch: int = REFINE_BATCH):
        self.student, self.denoiser, self.schedule = student, denoiser, schedule
        self.model_id, self.num_classes, self.size = str(model_id), int(num_classes), int(size)
        self.class_names = class_names
        self.steps = [int(i) for i in steps]
        self.report_steps = self._check(report_steps if report_steps is not None else self.steps)
        self.guidance, self.guidance_from = float(guidance), str(guidance_from)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device)
        self.mode, self.stride = mode, stride
        self.flip, self.scales = bool(flip), (list(scales) if scales else None)
        self.batch = int(batch)

    def _check(self, report: Sequence[int]) -> list[int]:
        report = sorted({int(i) for i in report})
        unknown = [i for i in report if i not in self.steps]
        if unknown or not report:
            raise ValueError(f"steps {unknown or report} are not run steps ({self.steps})")
        return report

    def _window_fn(self, report: list[int]) -> Callable[[np.ndarray], torch.Tensor]:
        """``uint8 [n, S, S, 3]`` -> float ``[n, K * len(report) + 1, S, S]``: the one-hot mask of
        each reported step, then the share of steps that changed the pixel."""
        from ddps_core.device import autocast
        from ddps_core.refiner.sample import free_renoising

        K, S, device = self.num_classes, self.size, self.device
        transitions = max(1, len(self.steps) - 1)

        def window_fn(windows: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(windows).to(device).permute(0, 3, 1, 2).float() / 255.0
            with torch.inference_mode(), autocast(device):
                feats, _ = self.student.features_and_logits(x)
            result = free_renoising(self.denoiser, self.schedule, feats.float(), steps=self.steps, collect=report,
                                    output_size=(S, S), guidance=self.guidance,
                                    guidance_from=self.guidance_from, generator=self.generator,
                                    changes=True)
            masks = result.masks()
            maps = [F.one_hot(masks[i], K).permute(0, 3, 1, 2).float() for i in report]
            maps.append((result.changes / transitions)[:, None])
            return torch.cat(maps, 1).cpu()

        return window_fn

    def _batch(self) -> int:
        """Windows per batch: ``batch``, fewer when the maps of every run step would pass
        :data:`MAP_BUDGET` (counted for all run steps, whichever are reported, so that the
        draws, hence the labels of a step, do not depend on which steps are asked for)."""
        per_window = (self.num_classes * len(self.steps) + 1) * self.size * self.size * 4
        return max(1, min(self.batch, MAP_BUDGET // per_window))

    def step_maps(self, images: Sequence[np.ndarray],
                  report: Sequence[int] | None = None) -> Iterator[tuple[dict[int, np.ndarray], np.ndarray]]:
        """Per image, in order: ``({step: H x W labels}, float32 H x W uncertainty)`` for the
        ``report`` steps (default :attr:`report_steps`)."""
        report = self._check(report if report is not None else self.report_steps)
        K, batch = self.num_classes, self._batch()
        window_fn = self._window_fn(report)
        for image in images:
            # the draws of an image come from a generator seeded by refiner.seed and the image's
            # pixels: its labels do not depend on the other images, their order or the batching
            self.generator.manual_seed(image_seed(self.seed, image))
            maps = next(image_maps([image], window_fn, self.size, self.mode, self.stride, batch,
                                   self.flip, self.scales))
            labels = {i: labels_of(maps[r * K:(r + 1) * K], K) for r, i in enumerate(report)}
            yield labels, maps[-1].numpy().astype(np.float32)

    def __call__(self, images: list[np.ndarray]) -> list[Prediction]:
        last = self.steps[-1]
        out = []
        for labels, uncertainty in self.step_maps(images, [last]):
            out.append(Prediction(labels=labels[last], uncertainty=uncertainty, score=float(uncertainty.mean())))
        return out


def refiner_predictors(settings: Any, device: torch.device | str | None = None, flip: bool = False,
                       scales: Sequence[float] | None = None,
                       say: Callable[[str], None] = lambda _m: None) -> tuple[Any, dict[str, RefinerPredictor]]:
    """The student predictor and a :class:`RefinerPredictor` per DDPS method of ``settings``
    (``refiner``; ``refiner-gt`` with ``refiner.ablation`` when its denoiser exists), sharing
    one loaded student. Raises :class:`~ddps_core.errors.DataError` for a denoiser of another
    student or class count and :class:`~ddps_core.errors.ConfigError` for
    ``refiner.refine_steps`` / ``refiner.report_steps`` the denoiser's schedule cannot run."""
    from ddps_core.device import resolve_device
    from ddps_core.errors import ConfigError, DataError
    from ddps_core.inference.student import load_student_predictor
    from ddps_core.refiner.base import freeze
    from ddps_core.refiner.sample import refinement_steps
    from ddps_core.refiner.stage import _load_denoisers, denoiser_folders
    from ddps_core.refiner.train import WEIGHTS_FILE

    cfg = settings.refiner
    device = resolve_device(str(settings.device if device is None else device))
    base = load_student_predictor(settings, device, flip=flip, scales=scales)
    student = freeze(base.student)
    out = {}
    for method, (model, schedule, _) in _load_denoisers(settings, base.model_id, device, say).items():
        folder = denoiser_folders(settings)[method]
        if model.num_classes != base.num_classes:
            raise DataError(f"{folder}: the denoiser has {model.num_classes} classes, the student "
                            f"{base.num_classes}; rerun the train_refiner stage")
        try:
            steps = refinement_steps(schedule.num_timesteps, cfg.refine_steps)
        except ValueError as exc:
            raise ConfigError(f"refiner.refine_steps: {exc} (the {method} denoiser has T = "
                              f"{schedule.num_timesteps})") from None
        report = cfg.report_steps or steps
        unknown = sorted(set(report) - set(steps))
        if unknown:
            raise ConfigError(f"refiner.report_steps: {unknown} are not run steps of the {method} denoiser "
                              f"(T = {schedule.num_timesteps}, refiner.refine_steps {cfg.refine_steps}: {steps})")
        # the weights and how they refine: a prediction made with other steps or guidance is another
        model_id = (f"{base.model_id}+{_file_id(folder / WEIGHTS_FILE)}+n{cfg.refine_steps}-w{cfg.guidance:g}"
                    f"-{cfg.guidance_from}-s{cfg.seed}")
        out[method] = RefinerPredictor(student, model, schedule, model_id=model_id, num_classes=base.num_classes,
                                       size=base.size, steps=steps, report_steps=report, guidance=cfg.guidance,
                                       guidance_from=cfg.guidance_from,
                                       seed=cfg.seed, class_names=base.class_names, device=device,
                                       mode=settings.data.resize, stride=settings.data.stride, flip=flip,
                                       scales=scales)
    return base, out


def _file_id(path: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_refiner_predictor(settings: Any, device: torch.device | str | None = None, flip: bool = False,
                           scales: Sequence[float] | None = None) -> RefinerPredictor:
    """The refiner (the first-prediction denoiser, ``refiner.out``, on the trained student)
    at the student's input size, tiling images as ``data.resize`` / ``data.stride`` say."""
    from ddps_core.refiner.stage import REFINER

    return refiner_predictors(settings, device, flip, scales)[1][REFINER]
