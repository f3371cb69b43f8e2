"""Composite pictures: overlays, image | ground truth | prediction triptychs, grids."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ddps_core.io import atomic_write_bytes
from ddps_core.viz.palette import colorize


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    return image


def overlay(
    image: np.ndarray, label: np.ndarray, alpha: float = 0.6, ignore_index: int | None = 255
) -> np.ndarray:
    """Blend the colourised ``label`` over ``image`` (``alpha`` = weight of the colours)."""
    image = _rgb(image)
    if image.shape[:2] != np.asarray(label).shape:
        raise ValueError(f"image {image.shape[:2]} and label {np.shape(label)} sizes differ")
    colours = colorize(label, ignore_index).astype(np.float32)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _upscale(panel: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return panel
    return np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)


def grid(
    panels: Sequence[Sequence[np.ndarray]], scale: int = 1, gap: int = 2, fill: int = 255
) -> np.ndarray:
    """Lay out rows of equally sized ``H x W x 3`` panels with ``gap`` pixels between them."""
    if not panels or not panels[0]:
        raise ValueError("grid needs at least one panel")
    h, w = panels[0][0].shape[:2]
    h, w = h * scale, w * scale
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    out = np.full(
        (n_rows * h + (n_rows - 1) * gap, n_cols * w + (n_cols - 1) * gap, 3), fill, np.uint8
    )
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            big = _upscale(_rgb(panel), scale)
            if big.shape[:2] != (h, w):
                raise ValueError(f"panel ({r}, {c}) has shape {panel.shape}, expected all equal")
            y, x = r * (h + gap), c * (w + gap)
            out[y : y + h, x : x + w] = big
    return out


def caption(text: str, width: int, height: int = 12) -> np.ndarray:
    """A white ``height x width`` strip with ``text`` in PIL's built-in bitmap font (no font
    files needed)."""
    from PIL import ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((2, 0), text, fill=(0, 0, 0))
    return np.asarray(img)


def with_header(picture: np.ndarray, names: Sequence[str], panel_width: int, gap: int = 2) -> np.ndarray:
    """``picture`` (a :func:`grid` of columns ``panel_width`` wide) with a caption strip on
    top naming its columns."""
    header = np.full((12, picture.shape[1], 3), 255, np.uint8)
    for c, name in enumerate(names):
        x = c * (panel_width + gap)
        header[:, x:x + panel_width] = caption(name, panel_width)
    return np.concatenate([header, np.full((gap, picture.shape[1], 3), 255, np.uint8), picture], axis=0)


def triptych(
    image: np.ndarray,
    gt: np.ndarray | None,
    pred: np.ndarray,
    alpha: float = 0.6,
    ignore_index: int | None = 255,
    scale: int | None = None,
) -> np.ndarray:
    """``image | ground truth overlay | prediction overlay`` side by side.

    Small images (the 32 x 32 synthetic domain) are upscaled with nearest neighbour so that
    every pixel stays visible; ``scale=None`` picks the factor that makes panels >= 128 px.
    """
    image = _rgb(image)
    if scale is None:
        scale = max(1, -(-128 // max(image.shape[:2])))
    row = [image]
    if gt is not None:
        row.append(overlay(image, gt, alpha, ignore_index))
    row.append(overlay(image, pred, alpha, ignore_index))
    return grid([row], scale=scale)


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a ``uint8`` ``H x W`` or ``H x W x 3`` array as PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_overlays(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    limit: int = 16,
    ignore_index: int | None = 255,
) -> list[Path]:
    """``image | ground truth | prediction`` PNGs for the first ``limit`` stems (sorted) that
    have an image (``.png``/``.jpg``) in ``images_dir``; returns the written paths."""
    from ddps_core.datasets import load_image
    from ddps_core.metrics.files import list_label_files, load_label_map

    preds = list_label_files(pred_dir, "prediction")
    gts = list_label_files(gt_dir, "ground-truth", npy_over_png=True)
    images = {p.stem: p for p in Path(images_dir).iterdir()
              if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.stem in preds}
    written = []
    for stem in sorted(set(images) & set(gts))[:limit]:
        image = load_image(images[stem])
        pred, gt = load_label_map(preds[stem]), load_label_map(gts[stem])
        if image.shape[:2] != gt.shape:
            continue  # an image folder of another resolution: nothing sensible to overlay
        path = Path(out_dir) / f"{stem}.png"
        save_png(triptych(image, gt, pred, ignore_index=ignore_index), path)
        written.append(path)
    return written
