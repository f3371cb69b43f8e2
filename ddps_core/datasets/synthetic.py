"""An embedded, procedurally generated face-parts segmentation domain (in the spirit of FFHQ-34).

Each image shows one cartoon head: a face (rotated, jittered superellipse-ish shape with a
tapered jaw, neck, optional ears), hair of random style and length (a back layer around the
head and a wavy fringe over the forehead), two eyes, two arched brows, a shaded nose and a
mouth, on a smooth random gradient / texture background with a torso in front of it.

Classes (in this order, see :data:`SYNTHETIC_CLASSES`): background, skin, hair, eyes, brows,
mouth, nose. The neck and ears are ``skin``; the torso (clothes) is ``background``.

The colour ranges of the classes are made to OVERLAP so that a pixel's colour alone does not
give its class: hair and brows share the same dark-to-blond palette; the background and the
clothes sometimes take skin-like or hair-like colours; the lips are a skin / red mix that can be
nearly skin coloured; the nose is skin with slight shading; eyes mix a light sclera with a dark
iris. A per-image lighting gradient, face shading and pixel noise are added on top.

Images are drawn at 4x the final resolution and block-averaged (anti-aliasing); the label is
the plurality class of each 4x4 block (ties go to the smaller parts), so eyes and brows remain a
few pixels large at 32x32.

Every image is a pure function of ``(seed, split, index, image_size)`` (via
:class:`numpy.random.SeedSequence`), so the splits are disjoint and regenerating with other
counts keeps the same image for the same index.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ddps_core.datasets.added import AddedLabels, count_files
from ddps_core.datasets.common import npy_bytes, png_bytes
from ddps_core.errors import DataError
from ddps_core.io import atomic_write_bytes, atomic_write_text, partial_folder, swap_folder

SYNTHETIC_CLASSES = ["background", "skin", "hair", "eyes", "brows", "mouth", "nose"]
BACKGROUND, SKIN, HAIR, EYES, BROWS, MOUTH, NOSE = range(7)
SUPPORTED_SIZES = (32, 64, 128)
SUPERSAMPLE = 4
GENERATOR = "ddps-synthetic-faces"
GENERATOR_VERSION = 1
IGNORE_INDEX = 255

_SPLIT_CODES = {"train": 1, "test": 2, "unlabeled": 3}
_SPLIT_PREFIX = {"train": "train_", "test": "test_", "unlabeled": "unl_"}
_SPLIT_DIGITS = {"train": 4, "test": 4, "unlabeled": 5}
# Tie-break priority in the label downsampling: small parts win ties.
_PRIORITY = np.array([0, 1, 2, 6, 5, 4, 3], dtype=np.int32)

# Colour palettes (RGB 0..255).
_SKIN_DARK = np.array([80.0, 52.0, 38.0])
_SKIN_LIGHT = np.array([245.0, 212.0, 190.0])
_HAIR_COLOURS = np.array(
    [
        [22, 18, 18],  # black
        [58, 40, 30],  # dark brown
        [105, 72, 48],  # brown
        [140, 70, 38],  # auburn / red
        [196, 160, 104],  # blond
        [225, 210, 175],  # platinum
        [150, 148, 146],  # grey
    ],
    dtype=np.float64,
)


# --------------------------------------------------------------------------------------------
# Colour sampling
# --------------------------------------------------------------------------------------------


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    t = rng.beta(1.6, 1.3)
    c = _SKIN_DARK + t * (_SKIN_LIGHT - _SKIN_DARK)
    return np.clip(c + rng.normal(0.0, 8.0, 3), 0, 255)


def _hair_colour(rng: np.random.Generator) -> np.ndarray:
    c = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.2)
    return np.clip(c + rng.normal(0.0, 10.0, 3), 0, 255)


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    """A background / clothes colour: often skin-like or hair-like, otherwise anything."""
    r = rng.random()
    if r < 0.3:
        return _skin_colour(rng)
    if r < 0.55:
        return _hair_colour(rng)
    grey = rng.uniform(20, 235)
    c = rng.uniform(0, 255, 3)
    return np.clip(grey + rng.uniform(0.2, 1.0) * (c - grey), 0, 255)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _grid(h: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(h, dtype=np.float32) + 0.5) / h).astype(np.float32)
    return np.broadcast_to(c[None, :], (h, h)), np.broadcast_to(c[:, None], (h, h))


def _paint(img: np.ndarray, lab: np.ndarray, mask: np.ndarray, colour: Any, cls: int) -> None:
    lab[mask] = cls
    if isinstance(colour, np.ndarray) and colour.ndim == 3:
        img[mask] = colour[mask]
    else:
        img[mask] = colour


def _render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one head at ``SUPERSAMPLE * size`` and downsample; returns (uint8 RGB, uint8 label)."""
    ss = SUPERSAMPLE
    h = size * ss
    x, y = _grid(h)
    f32 = np.float32
    u01 = rng.uniform

    # ---- background: two-colour gradient plus a low-frequency texture ----
    c1, c2 = _any_colour(rng), _any_colour(rng)
    ang = u01(0, 2 * np.pi)
    t = (np.cos(ang) * (x - 0.5) + np.sin(ang) * (y - 0.5)) * f32(u01(0.8, 1.6)) + f32(0.5)
    t = np.clip(t, 0, 1)[..., None]
    img = (c1.astype(f32) * (1 - t) + c2.astype(f32) * t).astype(f32)
    tex = np.zeros((h, h), f32)
    for _ in range(2):
        fx, fy = u01(-5, 5, 2)
        tex += f32(u01(0, 14)) * np.sin(f32(2 * np.pi) * (f32(fx) * x + f32(fy) * y) + f32(u01(0, 6.3)))
    img += tex[..., None]
    lab = np.zeros((h, h), np.uint8)

    # ---- head geometry (face coordinates a, b: unit ellipse = face outline) ----
    cx = 0.5 + float(np.clip(rng.normal(0, 0.035), -0.07, 0.07))
    cy = 0.47 + u01(-0.05, 0.05)
    rx = u01(0.22, 0.3)
    ry = rx * u01(1.15, 1.35)
    theta = u01(-0.25, 0.25)
    ct, st = f32(np.cos(theta)), f32(np.sin(theta))
    dx, dy = x - f32(cx), y - f32(cy)
    a = (ct * dx + st * dy) / f32(rx)
    b = (-st * dx + ct * dy) / f32(ry)

    skin = _skin_colour(rng).astype(f32)
    hair = _hair_colour(rng).astype(f32)

    # ---- torso / clothes (background class) ----
    tcy = cy + ry + u01(0.22, 0.38)
    torso = ((x - f32(cx)) / f32(u01(0.3, 0.46))) ** 2 + ((y - f32(tcy)) / f32(0.3)) ** 2 < 1
    _paint(img, lab, torso, _any_colour(rng).astype(f32), BACKGROUND)

    # ---- back hair ----
    length = u01(-0.3, 1.7) if rng.random() > 0.08 else -0.6  # a few almost bald heads
    ha, hb = u01(1.08, 1.35), u01(1.08, 1.3)
    shift = u01(0.0, 0.2)
    wav_amp, wav_f, wav_p = u01(0, 0.07), rng.integers(3, 9), u01(0, 6.3)
    ang_h = np.arctan2(b, a)
    wobble = 1 + f32(wav_amp) * np.sin(f32(wav_f) * ang_h + f32(wav_p))
    back = ((a / f32(ha)) ** 2 + ((b + f32(shift)) / f32(hb)) ** 2) < wobble**2
    if length > 0.3:
        back |= (np.abs(a) < f32(ha * u01(0.85, 1.02))) & (b > 0) & (b < f32(length))
    back &= b < f32(max(length, -0.15))
    strands = 1 + f32(u01(0.03, 0.12)) * np.sin(f32(u01(25, 60)) * a + f32(u01(0, 6.3)))
    hair_px = hair * strands[..., None]
    _paint(img, lab, back, hair_px, HAIR)

    # ---- neck and ears (skin) ----
    nw = u01(0.35, 0.5)
    neck = (np.abs(a) < f32(nw)) & (b > 0.4) & ~torso
    face_shade_k = u01(0.05, 0.2)
    neck_col = (skin * f32(u01(0.78, 0.92)))
    _paint(img, lab, neck, neck_col, SKIN)
    if length < 0.35 and rng.random() < 0.85:
        ear_b, ear_ra, ear_rb = u01(-0.05, 0.1), u01(0.12, 0.18), u01(0.18, 0.26)
        for side in (-1.0, 1.0):
            ear = ((a - f32(side * 0.98)) / f32(ear_ra)) ** 2 + ((b - f32(ear_b)) / f32(ear_rb)) ** 2 < 1
            _paint(img, lab, ear, skin * f32(0.9), SKIN)

    # ---- face ----
    taper = u01(0.0, 0.35)
    a_t = a * (1 + f32(taper) * np.maximum(b, 0))
    r2 = a_t**2 + b**2
    face = r2 < 1
    shade = (1 - f32(face_shade_k) * r2)[..., None]
    skin_px = skin * shade
    _paint(img, lab, face, skin_px, SKIN)

    # ---- fringe / hairline over the forehead ----
    hairline = u01(-0.78, -0.3) if length > -0.5 else -0.97
    fr = (
        f32(hairline)
        + f32(u01(0, 0.12)) * np.sin(f32(u01(3, 10)) * a + f32(u01(0, 6.3)))
        + f32(u01(0, 0.5)) * a**2
    )
    fringe = face & (b < fr)
    _paint(img, lab, fringe, hair_px, HAIR)

    # ---- eyes ----
    eye_b = u01(-0.14, 0.0)
    eye_da = u01(0.34, 0.46)
    eye_w, eye_h = u01(0.19, 0.27), u01(0.09, 0.135)
    sclera = np.full(3, u01(185, 250), np.float64) + rng.normal(0, 6, 3)
    iris = _any_colour(rng) * u01(0.3, 0.8)
    iris_frac = u01(0.35, 0.75)
    eye_tilt = u01(-0.25, 0.25)
    brow_gap = u01(0.17, 0.26)
    brow_w = eye_w * u01(1.1, 1.45)
    brow_t = u01(0.06, 0.09)
    arch = u01(0.0, 0.1)
    brow_col = np.clip(hair * f32(u01(0.55, 1.05)) + rng.normal(0, 8, 3).astype(f32), 0, 255)
    for side in (-1.0, 1.0):
        ea = a - f32(side * eye_da)
        eb = b - f32(eye_b) - f32(side * eye_tilt * 0.3) * ea
        ell = (ea / f32(eye_w)) ** 2 + (eb / f32(eye_h)) ** 2
        eye = (ell < 1) & face
        iris_m = eye & ((ea * f32(rx)) ** 2 + (eb * f32(ry)) ** 2 < f32((iris_frac * eye_h * ry) ** 2))
        _paint(img, lab, eye, sclera.astype(f32), EYES)
        img[iris_m] = iris.astype(f32)
        # brows: an arched band above the eye
        ba = a - f32(side * (eye_da + 0.02))
        curve = f32(eye_b - brow_gap) - f32(arch) * (1 - (ba / f32(brow_w)) ** 2)
        brow = (np.abs(b - curve) < f32(brow_t)) & (np.abs(ba) < f32(brow_w)) & face & ~eye
        _paint(img, lab, brow, brow_col, BROWS)

    # ---- nose: skin with one darker side and darker nostrils ----
    n_top, n_tip = eye_b + u01(0.02, 0.08), u01(0.2, 0.34)
    n_w = u01(0.13, 0.21)
    n_off = u01(-0.04, 0.04)
    na = a - f32(n_off)
    prog = np.clip((b - f32(n_top)) / f32(n_tip - n_top), 0, 1)
    nose = (b > f32(n_top)) & (b < f32(n_tip + 0.04)) & (np.abs(na) < f32(n_w) * (0.35 + 0.65 * prog))
    nose &= face
    side_dark = f32(u01(0.78, 0.92))
    nose_px = np.where((na * f32(np.sign(theta + 1e-3)) > 0)[..., None], skin_px * side_dark, skin_px * f32(1.03))
    nostril = nose & (np.abs(b - f32(n_tip)) < 0.035) & (np.abs(na) > f32(n_w * 0.25))
    _paint(img, lab, nose, nose_px, NOSE)
    img[nostril] *= f32(u01(0.6, 0.8))

    # ---- mouth: skin / red mix, sometimes open ----
    m_b = u01(0.47, 0.62)
    m_w, m_h = u01(0.28, 0.46), u01(0.075, 0.14)
    smile = u01(-0.06, 0.1)
    ma = a - f32(u01(-0.04, 0.04))
    mb = b - f32(m_b) + f32(smile) * (1 - (ma / f32(m_w)) ** 2)
    mouth = ((ma / f32(m_w)) ** 2 + (mb / f32(m_h)) ** 2 < 1) & face
    lip_red = np.array([175.0, 62.0, 72.0]) + rng.normal(0, 15, 3)
    lip_t = u01(0.12, 0.7)
    lips = np.clip(skin * (1 - lip_t) + lip_red * lip_t, 0, 255).astype(f32)
    _paint(img, lab, mouth, lips, MOUTH)
    if rng.random() < 0.3:
        inner = mouth & (np.abs(mb) < f32(m_h * 0.35))
        img[inner] = f32(u01(20, 230))

    # ---- downsample: block mean for the image, plurality for the label ----
    small = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    blocks = lab.reshape(size, ss, size, ss)
    counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(len(SYNTHETIC_CLASSES))], -1)
    label = np.argmax(counts.astype(np.int32) * 8 + _PRIORITY, axis=-1).astype(np.uint8)

    # ---- global lighting gradient and pixel noise ----
    xs = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    la = u01(0, 2 * np.pi)
    light = 1 + f32(u01(0.0, 0.45)) * (np.cos(la) * xs[None, :] + np.sin(la) * xs[:, None])
    small = small * light[..., None] * f32(u01(0.85, 1.1))
    small += rng.normal(0.0, u01(1.0, 5.0), small.shape).astype(np.float32)
    image = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return image, label


def _check_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or int(
        image_size
    ) not in SUPPORTED_SIZES:
        raise DataError(
            f"synthetic image_size must be one of {list(SUPPORTED_SIZES)}, got {image_size!r}"
        )
    return int(image_size)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"synthetic {name} must be a non-negative integer, got {value!r}")
    return int(value)


def synthetic_sample(
    seed: int, split: str, index: int, image_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Render sample ``index`` of ``split`` ("train", "test" or "unlabeled") for ``seed``.

    Returns ``(image uint8 HxWx3, label uint8 HxW)``; a pure function of its arguments.
    """
    size = _check_size(image_size)
    if split not in _SPLIT_CODES:
        raise DataError(f"synthetic split must be one of {list(_SPLIT_CODES)}, got {split!r}")
    seed = _check_count("seed", seed)
    index = _check_count("index", index)
    ss = np.random.SeedSequence([GENERATOR_VERSION, seed, _SPLIT_CODES[split], index])
    return _render(np.random.default_rng(ss), size)


def sample_id(split: str, index: int) -> str:
    """Zero-padded id of a synthetic sample: ``train_0000``, ``test_0000``, ``unl_00000``."""
    return f"{_SPLIT_PREFIX[split]}{index:0{_SPLIT_DIGITS[split]}d}"


# --------------------------------------------------------------------------------------------
# Writing the DDPM-Seg folder layout
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def _complete(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The stored summary if ``out`` holds a complete dataset made with ``settings``."""
    doc = _read_yaml(out / "classes.yaml")
    if doc is None or doc.get("synthetic") != settings:
        return None
    counts = (doc.get("summary") or {}).get("counts") or {}  # added labels move images: the recorded counts
    expected = {
        out / "real" / "train": counts.get("train", settings["n_labeled"]) * 2,
        out / "real" / "test": counts.get("test", settings["n_test"]) * 2,
        out / "unlabeled": counts.get("unlabeled", settings["n_unlabeled"]),
    }
    for folder, n in expected.items():
        try:
            names = [f for f in os.listdir(folder) if not f.startswith(".")]
        except OSError:
            return None
        if len(names) != n:
            return None
    summary = doc.get("summary")
    return dict(summary) if isinstance(summary, dict) else None


def make_synthetic(
    out_dir: str | os.PathLike[str],
    image_size: int = 32,
    n_unlabeled: int = 2000,
    n_labeled: int = 20,
    n_test: int = 100,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    added: AddedLabels | None = None,
) -> dict[str, Any]:
    """Write the synthetic face-parts domain in the DDPM-Seg folder layout::

        out_dir/real/train/train_0000.png + train_0000.npy     (n_labeled, uint8 labels)
        out_dir/real/test/test_0000.png + test_0000.npy        (n_test)
        out_dir/unlabeled/unl_00000.png                         (n_unlabeled)
        out_dir/classes.yaml    (classes, num_classes, ignore_index, image_size, seed, the full
                                 generator settings and the summary; written LAST)

    Returns a summary dict: ``counts`` per split, ``class_pixel_fractions`` over the labelled
    train + test pixels, ``image_size``, ``seed``, ``classes``, ``out_dir`` and ``reused``.

    Resumable and atomic:

    * if ``out_dir/classes.yaml`` records the same settings (and the file counts match), nothing
      is done (``reused=True``);
    * otherwise the dataset is built in the sibling folder ``.<name>.partial`` (every file
      written atomically; an interrupted build with the same settings resumes there, keeping
      the files already written) and, once complete, swapped in place of ``out_dir`` by rename.
      An existing ``out_dir`` is replaced only if it is empty or was made by this function;
      any other existing folder raises :class:`DataError` rather than being deleted.

    ``progress``, if given, is called as ``progress(n_done)`` after every image. ``added``:
    labels joined to the training split (:mod:`ddps_core.datasets.added`).
    """
    size = _check_size(image_size)
    counts = {
        "train": _check_count("n_labeled", n_labeled),
        "test": _check_count("n_test", n_test),
        "unlabeled": _check_count("n_unlabeled", n_unlabeled),
    }
    seed = _check_count("seed", seed)
    settings = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "image_size": size,
        "seed": seed,
        "n_labeled": counts["train"],
        "n_test": counts["test"],
        "n_unlabeled": counts["unlabeled"],
    }
    if added is not None:
        settings["added"] = added.record()
    out = Path(out_dir)
    done = _complete(out, settings) if out.is_dir() else None
    if done is not None:
        done["reused"] = True
        done["out_dir"] = str(out)
        return done
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder; cannot write the synthetic dataset")
        existing = _read_yaml(out / "classes.yaml")
        made_here = (
            existing is not None
            and isinstance(existing.get("synthetic"), dict)
            and existing["synthetic"].get("generator") == GENERATOR
        )
        if not made_here and any(out.iterdir()):
            raise DataError(
                f"{out}: folder exists, is not empty and was not made by make_synthetic "
                "(no matching classes.yaml); refusing to overwrite it"
            )

    partial = partial_folder(out, json.dumps(settings, sort_keys=True))

    pixel_counts = np.zeros(len(SYNTHETIC_CLASSES), dtype=np.int64)
    n_done = 0
    for split in ("train", "test", "unlabeled"):
        folder = partial / ("unlabeled" if split == "unlabeled" else f"real/{split}")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            sid = sample_id(split, i)
            png, npy = folder / f"{sid}.png", folder / f"{sid}.npy"
            labelled = split != "unlabeled"
            if png.is_file() and (not labelled or npy.is_file()):
                label = np.load(npy, allow_pickle=False) if labelled else None
            else:
                image, label = synthetic_sample(seed, split, i, size)
                if labelled:
                    atomic_write_bytes(npy, npy_bytes(label))
                atomic_write_bytes(png, png_bytes(image))
            if labelled:
                pixel_counts += np.bincount(label.ravel(), minlength=len(SYNTHETIC_CLASSES))[
                    : len(SYNTHETIC_CLASSES)
                ]
            n_done += 1
            if progress is not None:
                progress(n_done)

    if added is not None:
        def count(label: np.ndarray) -> None:
            pixel_counts[:] += np.bincount(label.ravel(), minlength=len(SYNTHETIC_CLASSES))[: len(SYNTHETIC_CLASSES)]

        added.apply(partial, count)
        counts["train"] = count_files(partial / "real" / "train")
        counts["unlabeled"] = count_files(partial / "unlabeled")
    total = int(pixel_counts.sum())
    fractions = {
        name: (round(float(c) / total, 6) if total else 0.0)
        for name, c in zip(SYNTHETIC_CLASSES, pixel_counts, strict=True)
    }
    summary = {
        "counts": dict(counts),
        "image_size": size,
        "seed": seed,
        "num_classes": len(SYNTHETIC_CLASSES),
        "classes": list(SYNTHETIC_CLASSES),
        "class_pixel_fractions": fractions,
    }
    doc = {
        "classes": list(SYNTHETIC_CLASSES),
        "num_classes": len(SYNTHETIC_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "image_size": size,
        "seed": seed,
        "synthetic": settings,
        "summary": summary,
    }
    atomic_write_text(partial / "classes.yaml", yaml.safe_dump(doc, sort_keys=False))

    swap_folder(partial, out)
    return {**summary, "out_dir": str(out), "reused": False}


__all__ = [
    "SUPPORTED_SIZES",
    "SYNTHETIC_CLASSES",
    "make_synthetic",
    "sample_id",
    "synthetic_sample",
]
