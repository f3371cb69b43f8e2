"""``ddps data add-labels``: check corrected masks and add them to the training split.

Masks are read by their content:

- palette PNGs (what ``ddps suggest`` writes, and what paint programs keep) and RGB(A)
  colour masks (what CVAT's "Segmentation mask 1.1" export holds): each colour is looked up
  in the class colours (:func:`ddps_core.viz.palette`, classes ``0 .. K-1``; the ignore
  colour ``IGNORE_COLOR`` is the ignore index). A colour that is no class's is an error naming
  the file, the colour and how many pixels have it;
- grey PNGs (8 or 16 bit) and ``.npy`` arrays: the values are the class ids (``0 .. K-1``
  or the ignore index);
- JPEG and other lossy files are refused (compression changes class ids).

Each mask must have the size of its image, found by id (file stem) in the images folder.
Every mask is checked before anything is written, so a bad one adds none. The pairs go to
``data.added`` as ``<id>.png`` + ``<id>.npy``, and the ``data`` stage is run, which joins
them to ``<data.out>/real/train`` (the image leaves ``unlabeled/``); ``dvc repro`` then
rebuilds what depends on the training split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddps_core.config import Settings
from ddps_core.errors import DataError
from ddps_core.predict.inputs import IMAGE_SUFFIXES
from ddps_core.progress import Reporter
from ddps_core.viz.palette import IGNORE_COLOR, palette

__all__ = ["add_labels", "decode_mask", "mask_folders"]

# masks: what a label can be, plus the lossy image formats, so that those are refused by name
_MASK_SUFFIXES = tuple(dict.fromkeys((".png", ".npy", *IMAGE_SUFFIXES)))


def _colour_table(num_classes: int, ignore_index: int) -> dict[tuple[int, int, int], int]:
    table = {tuple(int(v) for v in c): k for k, c in enumerate(palette(num_classes))}
    table.setdefault(tuple(IGNORE_COLOR), ignore_index)
    return table


def _by_colour(rgb: np.ndarray, path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    table = _colour_table(num_classes, ignore_index)
    flat = rgb.reshape(-1, 3).astype(np.uint32)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    uniq, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    ids = np.empty(len(uniq), dtype=np.int64)
    for u, (code, count) in enumerate(zip(uniq.tolist(), counts.tolist(), strict=True)):
        colour = (code >> 16, (code >> 8) & 255, code & 255)
        if colour not in table:
            raise DataError(f"{path}: colour {colour} on {count} pixels is not a class colour (classes "
                            f"0..{num_classes - 1} use the pre-labels' palette; {ignore_index} (ignore) uses "
                            f"{tuple(IGNORE_COLOR)})")
        ids[u] = table[colour]
    dtype = np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.uint16
    return ids[inverse].reshape(rgb.shape[:2]).astype(dtype)


def decode_mask(path: str | Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """The class ids of the mask file ``path`` (see the module text); one error line naming
    the file when it cannot be read, is lossy, or holds a colour or value that is no class."""
    from ddps_core.datasets.common import file_format, load_label, refuse_lossy

    path = Path(path)
    fmt = file_format(path)
    refuse_lossy(path, fmt, "mask")
    if fmt == "npy" or (fmt is None and path.suffix.lower() == ".npy"):
        ids = load_label(path)
    else:
        try:
            with Image.open(path) as im:
                # palette and colour masks by their colours; grey ones hold the ids (load_label)
                rgb = np.asarray(im.convert("RGB")) if im.mode in ("P", "RGB", "RGBA") else None
        except FileNotFoundError:
            raise DataError(f"{path}: mask file not found") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: cannot read mask (corrupt or not an image): {exc}") from None
        ids = _by_colour(rgb, path, num_classes, ignore_index) if rgb is not None else load_label(path)
    bad = (ids >= num_classes) & (ids != ignore_index)
    if bad.any():
        v = int(ids[bad][0])
        raise DataError(f"{path}: class id {v} on {int(bad.sum())} pixels is outside 0..{num_classes - 1} "
                        f"(and not the ignore index {ignore_index})")
    return ids


def mask_folders(folder: str | Path, images: str | Path | None, data_out: str | Path) -> tuple[Path, Path]:
    """(masks, images): a ``ddps suggest`` batch folder gives its ``prelabels/`` and
    ``images/``; any other folder holds the masks, with the images in ``images`` (default: the
    pool, ``<data.out>/unlabeled``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of masks")
    if (folder / "prelabels").is_dir() and (folder / "images").is_dir() and images is None:
        return folder / "prelabels", folder / "images"
    return folder, Path(images) if images is not None else Path(data_out) / "unlabeled"


def _find_image(images: Path, sid: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for name in (sid + suffix, sid + suffix.upper()):
            if (images / name).is_file():
                return images / name
    raise DataError(f"{images}: no image {sid}.* for the mask of id {sid!r} (masks and images are matched by file "
                    "name; pass --images DIR)")


def add_labels(settings: Settings, folder: str | Path, report: Reporter | None = None,
               images: str | Path | None = None) -> dict[str, Any]:
    """Check the masks of ``folder``, add them to ``data.added`` and run the ``data`` stage
    (see the module text); a summary: ``added``, ``replaced``, ``ids``, the dataset's counts."""
    from ddps_core.datasets.common import load_image, npy_bytes, png_bytes
    from ddps_core.datasets.stage import data as data_stage
    from ddps_core.io import atomic_write_bytes

    report = report or Reporter()
    if not settings.data.added:
        raise DataError("data.added is null: set it to the folder added labels are kept in (default data/added)")
    masks, image_dir = mask_folders(folder, images, settings.data.out)
    classes = Path(settings.data.out) / "classes.yaml"
    if not classes.is_file():
        raise DataError(f"{classes}: not found: the dataset must exist before labels are added (run stage data: "
                        "`ddps data prepare` or `dvc repro data`)")
    from ddps_core.datasets.common import read_classes_yaml

    names, declared = read_classes_yaml(classes)
    k = int(settings.data.num_classes or declared or len(names))
    ignore = int(settings.data.ignore_index)
    files = sorted(p for p in masks.iterdir() if p.suffix.lower() in _MASK_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{masks}: no mask files (png, npy) to add")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"{masks}: two masks for id {dup!r} ({', '.join(p.name for p in files if p.stem == dup)})")
    test = Path(settings.data.out) / "real" / "test"
    checked = []
    report.progress("add-labels: check", 0, len(files))
    for i, path in enumerate(files, 1):
        sid = path.stem
        if (test / f"{sid}.png").is_file():
            raise DataError(f"{path}: {sid!r} is an image of the test split; test labels are not added to training")
        image_path = _find_image(image_dir, sid)
        image = load_image(image_path)
        label = decode_mask(path, k, ignore)
        if label.shape != image.shape[:2]:
            raise DataError(f"{path}: mask is {label.shape[1]}x{label.shape[0]} (WxH), its image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]}")
        if (label == ignore).all():
            raise DataError(f"{path}: every pixel is the ignore index {ignore}: nothing to learn from")
        checked.append((sid, image, label))
        report.progress("add-labels: check", i, len(files))
    added = Path(settings.data.added)
    replaced = sum((added / f"{sid}.npy").is_file() for sid, _, _ in checked)
    for sid, image, label in checked:
        atomic_write_bytes(added / f"{sid}.png", png_bytes(image))
        atomic_write_bytes(added / f"{sid}.npy", npy_bytes(label))
    report.log(f"add-labels: {len(checked)} labels in {added} ({replaced} replaced); running stage data")
    _mark_added(Path(folder))
    summary = data_stage(settings, report)
    return {"added": len(checked), "replaced": replaced, "ids": [sid for sid, _, _ in checked],
            "folder": str(added), "counts": summary["counts"]}


def _mark_added(batch: Path) -> None:
    """Record a suggest batch's pre-labels as they are now (added), so that the next
    ``ddps suggest`` into the same folder may replace it."""
    from ddps_core.active.suggest import BATCH_RECORD, prelabel_sha
    from ddps_core.io import atomic_write_text

    record_path = batch / BATCH_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    record["prelabels"] = {sid: prelabel_sha(batch / "prelabels" / f"{sid}.png")
                           for sid in record.get("prelabels", {}) if (batch / "prelabels" / f"{sid}.png").is_file()}
    record["added"] = True
    atomic_write_text(record_path, json.dumps(record, indent=1))
