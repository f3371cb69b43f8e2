"""A fake :class:`~ddps_core.inference.Predictor`: a deterministic function of the pixels, so
that the tests of everything around the models need no trained model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ddps_core.inference import Prediction

NAMES = ["background", "red", "green", "yellow"]


def fake_labels(image: np.ndarray) -> np.ndarray:
    """Class 1 where red is bright, 2 where green is, 3 where both are, else 0."""
    return ((image[..., 0] > 127).astype(np.uint8) + 2 * (image[..., 1] > 127)).astype(np.uint8)


class FakePredictor:
    size = 32

    def __init__(self, model: str = "student", model_id: str = "fake-1", num_classes: int = 4,
                 uncertainty: bool = True, class_names: list[str] | None = NAMES, fail_on_call: int | None = None):
        self.model, self.model_id, self.num_classes = model, model_id, num_classes
        self.class_names = class_names
        self.uncertainty = uncertainty
        self.fail_on_call = fail_on_call
        self.calls: list[int] = []

    def __call__(self, images: list[np.ndarray]) -> list[Prediction]:
        self.calls.append(len(images))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("the device went away")
        out = []
        for im in images:
            assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3, (im.dtype, im.shape)
            unc = im[..., 2].astype(np.float32) / 255.0 if self.uncertainty else None
            out.append(Prediction(fake_labels(im), unc, float(unc.mean()) if unc is not None else math.nan))
        return out


def quadrants(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB image with black, red, green and yellow quadrants and a random blue channel."""
    rng = np.random.default_rng(seed)
    im = np.zeros((h, w, 3), np.uint8)
    im[: h // 2, w // 2:, 0] = 220                 # red
    im[h // 2:, : w // 2, 1] = 220                 # green
    im[h // 2:, w // 2:, :2] = 220                 # yellow
    im[..., 2] = rng.integers(0, 256, (h, w))
    return im


def mixed_folder(root: Path) -> dict[str, tuple[int, int]]:
    """A folder of images in every format and mode ``ddps predict`` reads, plus a non-image
    file and a hidden one; returns each image's name (relative, no suffix) and its H x W."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "photos").mkdir()
    sizes = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        im.save(root / name, **kw)
        sizes[name.rsplit(".", 1)[0]] = (im.height, im.width)

    save("wide.png", Image.fromarray(quadrants(64, 96, 1)))
    save("photos/holiday.jpg", Image.fromarray(quadrants(50, 70, 2)), quality=95)
    save("lossless.webp", Image.fromarray(quadrants(40, 30, 3)), lossless=True)
    save("scan.tif", Image.fromarray(quadrants(33, 47, 4)))
    save("photos/grey.png", Image.fromarray(quadrants(20, 25, 5)[..., 0]))
    rgba = np.concatenate([quadrants(30, 20, 6), np.full((30, 20, 1), 7, np.uint8)], axis=2)
    save("alpha.png", Image.fromarray(rgba))
    deep = (np.linspace(0, 65535, 24 * 36).reshape(24, 36)).astype(np.uint16)
    save("deep.png", Image.fromarray(deep))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"\x89PNG junk")
    return sizes
