"""What ``ddps predict`` writes for an image, as PNG bytes: the mask, the overlay with its
legend, the uncertainty heat map (docs/predict.md).

* **mask**: the class ids at the image's size. Up to 256 classes an 8-bit palette PNG (mode
  ``P``): the pixel values are the class ids, and the embedded palette is the project's class
  colours (:func:`ddps_core.viz.palette`), so an image viewer shows colours while every
  reader of label maps (PIL, ``ddps score``, numpy) gets the ids. Over 256 classes a 16-bit
  grayscale PNG of the ids (no palette: PNG palettes have 256 entries).
* **overlay**: the image blended with the class colours (half and half), above a white legend
  strip naming the classes present, ``<id> <name>`` beside a swatch of the colour
  (``class <id>`` when the model has no class names). The strip is as wide as the image, or
  wider when a name needs it; the image's pixels start at the top-left corner.
* **uncertainty**: an 8-bit palette PNG: the value ``round(255 * u / top)`` (``u`` clipped to
  ``[0, top]``) with matplotlib's ``inferno`` colours as its palette, so a viewer shows a heat
  map and ``u = value * top / 255`` reads back to 1/255 of ``top``. ``top`` is the
  predictor's ``uncertainty_max`` when it has one (the teacher: ``ln(members)``, as the label
  stage scales its maps), else 1 (the refiner's share of steps that changed a pixel).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddps_core.viz.palette import palette
from ddps_core.viz.pictures import overlay

__all__ = ["ALPHA", "heat_png", "legend_height", "mask_png", "overlay_picture", "overlay_png"]

#: Weight of the class colours in an overlay.
ALPHA = 0.5


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def mask_png(labels: np.ndarray, num_classes: int) -> bytes:
    """The mask PNG of ``H x W`` class ids (see the module text)."""
    labels = np.asarray(labels)
    if num_classes <= 256:
        im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
        im.putpalette(palette(256).ravel().tolist())
        return _png(im)
    return _png(Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _font_size(width: int) -> int:
    return int(np.clip(width // 40, 10, 32))


def _entries(labels: np.ndarray, class_names: Sequence[str] | None) -> list[tuple[int, str]]:
    present = np.flatnonzero(np.bincount(np.asarray(labels, dtype=np.int64).ravel()))
    names = list(class_names or [])
    return [(int(c), f"{c} {names[c]}" if c < len(names) else f"{c} class {c}") for c in present]


def _layout(entries: list[tuple[int, str]], width: int, size: int) -> tuple[int, list[tuple[int, int, int, str]]]:
    """The legend's width and each entry's ``(x, y, class, text)``, wrapped to ``width`` (or
    to the widest entry)."""
    font, pad, swatch = _font(size), max(2, size // 3), size
    widths = [swatch + pad + int(np.ceil(font.getlength(text))) for _, text in entries]
    width = max(width, max(widths, default=0) + 2 * pad)
    placed: list[tuple[int, int, int, str]] = []
    x, y = pad, pad
    for (c, text), w in zip(entries, widths):
        if x > pad and x + w > width - pad:
            x, y = pad, y + size + pad
        placed.append((x, y, c, text))
        x += w + 2 * pad
    return width, placed


def legend_height(labels: np.ndarray, class_names: Sequence[str] | None, width: int) -> int:
    """Height of the legend strip under an overlay of ``labels`` ``width`` pixels wide."""
    size = _font_size(width)
    _, placed = _layout(_entries(labels, class_names), width, size)
    return (placed[-1][1] if placed else 0) + size + 2 * max(2, size // 3)


def overlay_picture(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None) -> np.ndarray:
    """The overlay: ``image`` blended with the colours of ``labels``, above the legend."""
    h, w = image.shape[:2]
    blended = overlay(image, labels, alpha=ALPHA, ignore_index=None)
    size = _font_size(w)
    entries = _entries(labels, class_names)
    width, placed = _layout(entries, w, size)
    height = h + legend_height(labels, class_names, w)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(max(c for c, _ in entries) + 1) if entries else palette(1)
    font, pad = _font(size), max(2, size // 3)
    for x, y, c, text in placed:
        top = h + y
        draw.rectangle([x, top, x + size - 1, top + size - 1], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))
        x0, y0, _, y1 = draw.textbbox((0, 0), text, font=font)  # centred on the swatch, any font
        draw.text((x + size + pad - x0, top + (size - (y1 - y0)) // 2 - y0), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def overlay_png(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None) -> bytes:
    return _png(Image.fromarray(overlay_picture(image, labels, class_names)))


@lru_cache(maxsize=1)
def _heat_palette() -> list[int]:
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.rint(rgb * 255).astype(np.uint8).ravel().tolist()


def heat_png(uncertainty: np.ndarray, top: float = 1.0) -> bytes:
    """The uncertainty heat map PNG (see the module text)."""
    u = np.nan_to_num(np.asarray(uncertainty, dtype=np.float64), nan=0.0)
    scale = 255.0 / top if top > 0 else 0.0
    im = Image.fromarray(np.clip(np.rint(u * scale), 0, 255).astype(np.uint8))
    im.putpalette(_heat_palette())
    return _png(im)
