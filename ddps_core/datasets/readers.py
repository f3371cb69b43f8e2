"""Readers of the supported on-disk dataset layouts, and the :func:`open_dataset` factory.

All readers share one interface (see :class:`~ddps_core.datasets.common.BaseReader`):
``len()``, iteration (lazy, one file at a time, sorted by id), ``reader[i]``, ``.ids``,
``.num_classes``, ``.ignore_index`` and ``.class_names``. Cheap checks (folders exist, split not
empty, duplicate stems, missing labels) run at construction; each file is validated when read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddps_core.datasets.common import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    BaseReader,
    path_inside,
    require_dir,
    resolve_classes,
    scan_by_stem,
)
from ddps_core.errors import DataError

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# DDPM-Seg folder layout
# --------------------------------------------------------------------------------------------


class DDPMSegFolder(BaseReader):
    """The DDPM-Seg dataset layout (Baranchuk et al. 2022)::

        <root>/real/train/<id>.png|jpg|jpeg  +  <root>/real/train/<id>.npy   (uint8 class ids)
        <root>/real/test/...
        <root>/unlabeled/<id>.png|jpg|jpeg                                   (no labels)
        <root>/classes.yaml     (optional: class names, and num_classes when not given)

    ``split`` is ``"train"``, ``"test"`` or ``"unlabeled"``. ``require_labels`` defaults to True
    for train/test and False for unlabeled; with it False an image without ``.npy`` yields
    ``label=None``. A ``.npy`` without a matching image is an error in a labelled split.
    """

    SPLITS = ("train", "test", "unlabeled")

    def __init__(
        self,
        root: PathLike,
        split: str,
        num_classes: int | None = None,
        ignore_index: int = 255,
        require_labels: bool | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if split not in self.SPLITS:
            raise DataError(f"{self.root}: unknown DDPM-Seg split {split!r}; valid: {list(self.SPLITS)}")
        require_dir(self.root, "dataset root")
        self.split = split
        self.num_classes, self.class_names = resolve_classes(self.root, num_classes, ignore_index)
        self.ignore_index = int(ignore_index)
        labelled = split != "unlabeled"
        self.require_labels = labelled if require_labels is None else bool(require_labels)
        folder = self.root / "real" / split if labelled else self.root / "unlabeled"
        require_dir(folder, f"{split!r} split")
        self.folder = folder
        images = scan_by_stem(folder, IMAGE_SUFFIXES)
        labels = scan_by_stem(folder, (".npy",)) if labelled else {}
        entries = []
        for sid, ip in images.items():
            lp = labels.get(sid)
            if lp is None and self.require_labels:
                raise DataError(f"{ip}: image has no label (expected {folder / (sid + '.npy')})")
            entries.append((sid, ip, lp))
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DataError(
                f"{labels[orphans[0]]}: label has no matching image ({sid_hint(folder, orphans[0])})"
                + (f"; {len(orphans) - 1} more such label file(s)" if len(orphans) > 1 else "")
            )
        self.has_labels = labelled and any(e[2] is not None for e in entries)
        self._set_entries(entries, folder)


def sid_hint(folder: Path, sid: str) -> str:
    return "expected " + " or ".join(str(folder / (sid + s)) for s in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------
# ADE20K (ADEChallengeData2016)
# --------------------------------------------------------------------------------------------

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip

# reduce_zero_label: annotation 0 ("other") -> 255 (ignore), v -> v - 1.
_ADE_LUT = np.concatenate([[255], np.arange(255)]).astype(np.uint8)


class ADE20K(BaseReader):
    """ADE20K scene parsing (ADEChallengeData2016)::

        <root>/images/<split>/*.jpg     <root>/annotations/<split>/*.png

    ``split`` is ``"training"`` or ``"validation"``. 150 classes with ``reduce_zero_label``:
    annotation 0 becomes 255 (ignored), any other value v becomes v - 1.
    """

    SPLITS = ("training", "validation")
    NUM_CLASSES = 150
    _label_note = " (after reduce_zero_label: annotation value v -> v-1)"

    def __init__(self, root: PathLike, split: str) -> None:
        super().__init__()
        self.root = Path(root)
        if split not in self.SPLITS:
            raise DataError(f"{self.root}: unknown ADE20K split {split!r}; valid: {list(self.SPLITS)}")
        require_dir(self.root, "dataset root")
        self.split = split
        self.num_classes = self.NUM_CLASSES
        self.ignore_index = 255
        self.class_names = list(ADE20K_CLASSES)
        self.has_labels = True
        img_dir = self.root / "images" / split
        ann_dir = self.root / "annotations" / split
        require_dir(img_dir, f"ADE20K images/{split}")
        require_dir(ann_dir, f"ADE20K annotations/{split}")
        self.folder = img_dir
        images = scan_by_stem(img_dir, IMAGE_SUFFIXES)
        anns = scan_by_stem(ann_dir, (".png",))
        entries = []
        for sid, ip in images.items():
            if sid not in anns:
                raise DataError(f"{ip}: image has no annotation (expected {ann_dir / (sid + '.png')})")
            entries.append((sid, ip, anns[sid]))
        self._set_entries(entries, img_dir)

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.dtype != np.uint8:
            hi = int(raw.max())
            if hi > 255:
                raise DataError(
                    f"{path}: annotation value {hi} >= num_classes={self.NUM_CLASSES} + 1 "
                    "(ADE20K annotations hold 0..150)"
                )
            raw = raw.astype(np.uint8)
        return _ADE_LUT[raw]


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]  # fmt: skip

# labelIds of the 19 evaluated classes, in trainId order.
CITYSCAPES_EVAL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def cityscapes_label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map Cityscapes ``labelIds`` to the 19 ``trainIds`` (every other id -> 255), as uint8."""
    size = max(256, int(label_ids.max(initial=0)) + 1)
    lut = np.full(size, 255, dtype=np.uint8)
    lut[list(CITYSCAPES_EVAL_IDS)] = np.arange(19, dtype=np.uint8)
    return lut[label_ids]


class Cityscapes(BaseReader):
    """Cityscapes fine annotations::

        <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
        <root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png   (used when present)
        <root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png        (mapped to 19 trainIds)

    ``split`` is ``"train"``, ``"val"`` or ``"test"``; ``id`` is ``<name>``. Labels are required
    for train / val; for test (whose public labels are dummies) they are optional
    (``require_labels=None`` picks this default).
    """

    SPLITS = ("train", "val", "test")
    NUM_CLASSES = 19
    _IMG_SUFFIX = "_leftImg8bit.png"

    def __init__(self, root: PathLike, split: str, require_labels: bool | None = None) -> None:
        super().__init__()
        self.root = Path(root)
        if split not in self.SPLITS:
            raise DataError(f"{self.root}: unknown Cityscapes split {split!r}; valid: {list(self.SPLITS)}")
        require_dir(self.root, "dataset root")
        self.split = split
        self.num_classes = self.NUM_CLASSES
        self.ignore_index = 255
        self.class_names = list(CITYSCAPES_CLASSES)
        self.require_labels = (split != "test") if require_labels is None else bool(require_labels)
        img_root = self.root / "leftImg8bit" / split
        gt_root = self.root / "gtFine" / split
        require_dir(img_root, f"Cityscapes leftImg8bit/{split}")
        if self.require_labels:
            require_dir(gt_root, f"Cityscapes gtFine/{split}")
        self.folder = img_root
        self._train_id_files: set[Path] = set()
        entries: list[tuple[str, Path, Path | None]] = []
        seen: dict[str, Path] = {}
        cities = sorted(p for p in img_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for city in cities:
            images = scan_by_stem(city, (".png",), self._stem_of)
            for sid, ip in images.items():
                if sid in seen:
                    raise DataError(f"{seen[sid]} and {ip}: duplicate Cityscapes image name {sid!r}")
                seen[sid] = ip
                train_ids = gt_root / city.name / f"{sid}_gtFine_labelTrainIds.png"
                label_ids = gt_root / city.name / f"{sid}_gtFine_labelIds.png"
                if train_ids.is_file():
                    lp: Path | None = train_ids
                    self._train_id_files.add(train_ids)
                elif label_ids.is_file():
                    lp = label_ids
                elif self.require_labels:
                    raise DataError(f"{ip}: image has no label (expected {label_ids} or {train_ids})")
                else:
                    lp = None
                entries.append((sid, ip, lp))
        self.has_labels = any(e[2] is not None for e in entries)
        self._set_entries(entries, img_root)

    @classmethod
    def _stem_of(cls, name: str) -> str | None:
        return name[: -len(cls._IMG_SUFFIX)] if name.endswith(cls._IMG_SUFFIX) else None

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if path in self._train_id_files:
            return raw
        return cityscapes_label_ids_to_train_ids(raw)


# --------------------------------------------------------------------------------------------
# Generic images/ + masks/ folder
# --------------------------------------------------------------------------------------------


class GenericFolder(BaseReader):
    """A user folder of images and masks matched by file stem::

        <root>/images/<id>.png|jpg|jpeg
        <root>/masks/<id>.png | <id>.npy       (single-channel class ids)
        <root>/classes.yaml                     (optional: names, and num_classes if not given)

    An image without a mask raises :class:`DataError` when ``require_labels`` (else it yields
    ``label=None``); a mask without an image always raises.
    """

    def __init__(
        self,
        root: PathLike,
        num_classes: int | None = None,
        ignore_index: int = 255,
        require_labels: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        require_dir(self.root, "dataset root")
        self.num_classes, self.class_names = resolve_classes(self.root, num_classes, ignore_index)
        self.ignore_index = int(ignore_index)
        self.require_labels = bool(require_labels)
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        require_dir(img_dir, "images")
        if self.require_labels:
            require_dir(mask_dir, "masks")
        self.folder = img_dir
        images = scan_by_stem(img_dir, IMAGE_SUFFIXES)
        masks = scan_by_stem(mask_dir, LABEL_SUFFIXES) if mask_dir.is_dir() else {}
        entries = []
        for sid, ip in images.items():
            mp = masks.get(sid)
            if mp is None and self.require_labels:
                others = sorted(mask_dir.glob(f"{sid}.*"))
                hint = (
                    f"; found {others[0]} but masks must be .png or .npy" if others else ""
                )
                raise DataError(
                    f"{ip}: image has no mask (expected {mask_dir / (sid + '.png')} or "
                    f"{mask_dir / (sid + '.npy')}){hint}"
                )
            entries.append((sid, ip, mp))
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise DataError(
                f"{masks[orphans[0]]}: mask has no matching image ({sid_hint(img_dir, orphans[0])})"
                + (f"; {len(orphans) - 1} more such mask(s)" if len(orphans) > 1 else "")
            )
        self.has_labels = any(e[2] is not None for e in entries)
        self._set_entries(entries, img_dir)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

DATASET_KINDS = ("ddpm-seg", "ade20k", "cityscapes", "folder")

_ADE_SPLIT_ALIASES = {"train": "training", "val": "validation"}
_CITY_SPLIT_ALIASES = {"validation": "val", "training": "train"}


def split_folders(kind: str, root: PathLike) -> dict[str, Path]:
    """The split folders present in ``root`` for ``kind``, by the reader's split name:
    ``real/<split>/`` and ``unlabeled/`` (ddpm-seg), ``images/<split>/`` (ade20k),
    ``leftImg8bit/<split>/`` (cityscapes), ``<split>/`` with an ``images/`` folder (folder)."""
    root = Path(root)

    def subdirs(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")} \
            if folder.is_dir() else {}

    if kind == "ddpm-seg":
        found = subdirs(root / "real")
        if (root / "unlabeled").is_dir():
            found["unlabeled"] = root / "unlabeled"
        return found
    if kind == "ade20k":
        return subdirs(root / "images")
    if kind == "cityscapes":
        return subdirs(root / "leftImg8bit")
    if kind == "folder":
        return {name: p for name, p in subdirs(root).items() if (p / "images").is_dir()}
    return {}


def _check_fixed(kind: str, root: Path, num_classes: int | None, ignore_index: int, n: int) -> None:
    if num_classes is not None and num_classes != n:
        raise DataError(f"{root}: {kind} has {n} classes, but num_classes={num_classes} was given")
    if ignore_index != 255:
        raise DataError(f"{root}: {kind} uses ignore_index=255, but ignore_index={ignore_index} was given")


def open_dataset(
    kind: str,
    root: PathLike,
    split: str | None,
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> BaseReader:
    """Open a dataset reader of the given ``kind``.

    * ``"ddpm-seg"`` -> :class:`DDPMSegFolder` (split train / test / unlabeled)
    * ``"ade20k"`` -> :class:`ADE20K` (split training / validation; train / val accepted)
    * ``"cityscapes"`` -> :class:`Cityscapes` (split train / val / test)
    * ``"folder"`` -> :class:`GenericFolder` on ``<root>/<split>`` (or on ``<root>`` itself when
      ``split`` is None, ``""`` or ``"all"``)

    ADE20K and Cityscapes have fixed class sets; a conflicting ``num_classes`` or
    ``ignore_index`` raises :class:`DataError`.
    """
    root = Path(root)
    if kind == "ddpm-seg":
        if split is None:
            raise DataError(f"{root}: a split (train / test / unlabeled) is required for ddpm-seg")
        return DDPMSegFolder(root, split, num_classes=num_classes, ignore_index=ignore_index)
    if kind == "ade20k":
        _check_fixed(kind, root, num_classes, ignore_index, ADE20K.NUM_CLASSES)
        split = _ADE_SPLIT_ALIASES.get(split or "", split)
        return ADE20K(root, split)  # type: ignore[arg-type]
    if kind == "cityscapes":
        _check_fixed(kind, root, num_classes, ignore_index, Cityscapes.NUM_CLASSES)
        split = _CITY_SPLIT_ALIASES.get(split or "", split)
        return Cityscapes(root, split)  # type: ignore[arg-type]
    if kind == "folder":
        folder = root if split in (None, "", "all") else path_inside(root, split, f"{root}: split")
        if not folder.is_dir():
            raise DataError(f"{folder}: folder for split {split!r} does not exist")
        return GenericFolder(folder, num_classes=num_classes, ignore_index=ignore_index,
                             require_labels=split != "unlabeled")
    raise DataError(f"unknown dataset kind {kind!r} (for {root}); valid kinds: {list(DATASET_KINDS)}")


__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_EVAL_IDS",
    "DATASET_KINDS",
    "Cityscapes",
    "DDPMSegFolder",
    "GenericFolder",
    "cityscapes_label_ids_to_train_ids",
    "open_dataset",
    "split_folders",
]
