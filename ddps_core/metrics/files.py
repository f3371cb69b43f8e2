"""Evaluate folders of label maps (PNG or ``.npy``) and read class-name files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps

from ddps_core.datasets.common import file_format, refuse_lossy
from ddps_core.errors import DataError
from ddps_core.metrics.segmentation import (
    ConfusionAccumulator,
    SegmentationResult,
    as_label_map,
)

__all__ = ["LABEL_SUFFIXES", "evaluate_dirs", "list_label_files", "load_class_names", "load_label_map"]

LABEL_SUFFIXES = (".png", ".npy")

# PNG modes that hold one value per pixel (palette images give their indices).
_SINGLE_CHANNEL_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def load_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one single-channel class-id map from a ``.png`` or ``.npy`` file.

    The file is decoded by its content, whatever its name says: ``.npy`` bytes as an array,
    PNG bytes as an image; JPEG (or lossy WebP) bytes are refused, since lossy compression
    changes class ids. Raises :class:`DataError` naming ``path`` when it cannot be read or is
    not a 2-D map of integer class ids.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = file_format(path)
    refuse_lossy(path, fmt, "label map")
    if fmt == "npy" or (fmt is None and suffix == ".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: cannot read .npy label map ({exc})") from exc
        if not isinstance(array, np.ndarray):
            raise DataError(f"{path}: expected a single array, got {type(array).__name__}")
    elif fmt == "png" or suffix == ".png":
        try:
            with Image.open(path) as raw:
                raw.load()
                img = ImageOps.exif_transpose(raw)  # as the dataset import reads label maps
                mode = img.mode
                if mode not in _SINGLE_CHANNEL_MODES:
                    raise DataError(
                        f"{path}: PNG mode {mode!r} is not a single-channel class-id map "
                        "(expected mode L, P, I or I;16)"
                    )
                array = np.array(img)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot read PNG label map ({exc})") from exc
    else:
        raise DataError(f"{path}: unsupported label file type; expected one of {LABEL_SUFFIXES}")
    return as_label_map(array, str(path))


def list_label_files(
    folder: str | os.PathLike[str], what: str, npy_over_png: bool = False
) -> dict[str, Path]:
    """Map stem -> file for the ``.png`` / ``.npy`` files directly inside ``folder``.

    Hidden files and other extensions are skipped. Raises :class:`DataError` for a missing
    folder, a folder without label files, or two files sharing one stem. With
    ``npy_over_png`` a stem with exactly one ``.png`` and one ``.npy`` is the DDPM-Seg layout
    (the PNG is the image, the ``.npy`` its label) and resolves to the ``.npy``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist or is not a directory")
    found: dict[str, list[Path]] = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.suffix.lower() not in LABEL_SUFFIXES:
            continue
        if entry.is_symlink() and not entry.exists():
            raise DataError(f"{entry}: {what} file is a dangling symbolic link (its target "
                            f"{os.readlink(entry)} does not exist)")
        if not entry.is_file():
            continue
        found.setdefault(entry.stem, []).append(entry)
    if not found:
        raise DataError(f"{what} folder {folder} contains no .png or .npy label files")
    if npy_over_png:
        for stem, paths in found.items():
            suffixes = sorted(p.suffix.lower() for p in paths)
            if suffixes == [".npy", ".png"]:
                found[stem] = [p for p in paths if p.suffix.lower() == ".npy"]
    dups = {stem: paths for stem, paths in found.items() if len(paths) > 1}
    if dups:
        shown = "; ".join(
            f"{stem}: " + ", ".join(sorted(p.name for p in paths))
            for stem, paths in sorted(dups.items())[:10]
        )
        raise DataError(f"{what} folder {folder} has several files with the same stem ({shown})")
    return {stem: paths[0] for stem, paths in found.items()}


def _stem_list(stems: list[str]) -> str:
    shown = ", ".join(stems[:10])
    return shown + (f" ... ({len(stems)} in all)" if len(stems) > 10 else "")


def evaluate_dirs(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    num_classes: int,
    ignore_index: int = 255,
    boundary_ratio: float = 0.02,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentationResult:
    """Evaluate every prediction in ``pred_dir`` against the ground truth in ``gt_dir``.

    Files are matched by stem and processed in sorted stem order; the stem is the image id.
    ``gt_dir`` may be a DDPM-Seg split folder (``<id>.png`` image + ``<id>.npy`` label): there
    the ``.npy`` is the ground truth.
    ``progress(done, total)`` is called after each image when given. Unmatched stems, empty
    folders, duplicate stems, unreadable files and size mismatches raise :class:`DataError`.
    """
    pred_dir = Path(pred_dir)
    gt_dir = Path(gt_dir)
    acc = ConfusionAccumulator(num_classes, ignore_index=ignore_index, boundary_ratio=boundary_ratio)
    preds = list_label_files(pred_dir, "prediction")
    gts = list_label_files(gt_dir, "ground-truth", npy_over_png=True)
    no_gt = sorted(set(preds) - set(gts))
    no_pred = sorted(set(gts) - set(preds))
    problems = []
    if no_gt:
        problems.append(f"prediction(s) in {pred_dir} without ground truth in {gt_dir}: {_stem_list(no_gt)}")
    if no_pred:
        problems.append(f"ground truth in {gt_dir} without prediction in {pred_dir}: {_stem_list(no_pred)}")
    if problems:
        raise DataError("; ".join(problems))
    stems = sorted(preds)
    total = len(stems)
    for done, stem in enumerate(stems, start=1):
        pred_path, gt_path = preds[stem], gts[stem]
        pred = load_label_map(pred_path)
        gt = load_label_map(gt_path)
        if pred.shape != gt.shape:
            raise DataError(
                f"size mismatch: prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} (WxH) "
                f"but ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}"
            )
        acc.update(pred, gt, stem, source=f"{gt_path} / {pred_path}")
        if progress is not None:
            progress(done, total)
    return acc.result()


def load_class_names(path: str | os.PathLike[str], num_classes: int | None = None) -> list[str]:
    """Read class names from a YAML file.

    Accepted layouts: a list of names; ``{"classes": [names]}``; ``{"classes": {id: name}}``;
    or ``{id: name}`` with ids ``0 .. N-1`` (integers or integer strings). When ``num_classes``
    is given the number of names must match. Raises :class:`DataError` naming ``path``.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise DataError(f"{path}: cannot read class names ({exc})") from exc
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML ({exc})") from exc

    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, list):
        raw = data
    elif isinstance(data, dict):
        by_id: dict[int, object] = {}
        for key, value in data.items():
            try:
                idx = int(key)
                if isinstance(key, bool) or str(idx) != str(key).strip():
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(
                    f"{path}: expected a list of class names or a mapping of class id -> name, "
                    f"found key {key!r}"
                ) from None
            by_id[idx] = value
        if sorted(by_id) != list(range(len(by_id))):
            raise DataError(
                f"{path}: class ids must be 0..{len(by_id) - 1} without gaps, got {sorted(by_id)}"
            )
        raw = [by_id[i] for i in range(len(by_id))]
    else:
        raise DataError(
            f"{path}: expected a list of class names, {{classes: [...]}} or {{id: name}}, "
            f"got {type(data).__name__}"
        )
    names: list[str] = []
    for i, name in enumerate(raw):
        if isinstance(name, bool) or not isinstance(name, (str, int, float)) or str(name).strip() == "":
            raise DataError(f"{path}: class {i} has an invalid name {name!r}")
        names.append(str(name))
    if not names:
        raise DataError(f"{path}: no class names")
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{path}: lists {len(names)} class names but num_classes is {num_classes}")
    return names
