"""Shared pieces of the dataset readers: the :class:`Sample` record, validated image / label
loading, ``classes.yaml`` parsing, folder scanning and :func:`to_square`.

Every problem with an input file is raised as :class:`~ddps_core.errors.DataError` whose
message names the file (full path) and says what is wrong with it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from ddps_core.errors import DataError, DataWarning

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png", ".npy")

# Decoding failures PIL / numpy raise for unreadable, truncated or corrupt files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class Sample(NamedTuple):
    """One image with its label map (``None`` when the split has no labels)."""

    image: np.ndarray  # uint8 HxWx3 RGB
    label: np.ndarray | None  # uint8 or uint16 HxW class ids
    id: str  # the file stem


# --------------------------------------------------------------------------------------------
# File loading
# --------------------------------------------------------------------------------------------


# What a file holds, told by its first bytes (its name may lie: JPEG bytes in a .png).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\x93NUMPY", "npy"),
    (b"\xff\xd8\xff", "jpeg"),
)
#: Formats whose compression changes pixel values: never a label map (class ids would change
#: at every edge, silently).
LOSSY_FORMATS = ("jpeg", "webp (lossy)")


def file_format(path: str | os.PathLike[str]) -> str | None:
    """The format of ``path`` by content: ``png``, ``npy``, ``jpeg``, ``webp (lossy)``,
    ``webp``, or None when the first bytes say nothing we know (or it cannot be read: the
    reader that follows names that fault)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp (lossy)" if head[12:16] == b"VP8 " else "webp"
    return None


def refuse_lossy(path: Path, fmt: str | None, what: str) -> None:
    """A :class:`DataError` when ``fmt`` (from :func:`file_format`) is lossy: ``what`` (a
    label map, a prediction) must hold exact class ids."""
    if fmt in LOSSY_FORMATS:
        raise DataError(f"{path}: {what} holds {fmt.upper()} data (whatever its name says); that compression "
                        f"is lossy and changes class ids at every edge, so it is refused: save it as PNG or .npy")


def eight_bit(arr: np.ndarray, path: Path) -> np.ndarray:
    """A 16-bit grey image as 8 bits, by one rule for every file: the high byte, ``v >> 8``
    (16-bit colour images are decoded to their high byte too). It maps 8-bit values stored
    as 16 bits (``v * 257``) back exactly, and a value means the same in every file."""
    lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
    if lo < 0 or hi > 65535:
        raise DataError(f"{path}: image values {lo}..{hi} exceed the 16-bit range 0..65535; convert it to an "
                        "8- or 16-bit PNG")
    return (arr.astype(np.uint32) >> 8).astype(np.uint8)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB, as it is displayed (an EXIF orientation tag
    is applied), converted by the rule of :func:`to_rgb`."""
    path = Path(path)
    try:
        with Image.open(path) as raw:
            raw.load()
            arr = to_rgb(ImageOps.exif_transpose(raw), path)
    except FileNotFoundError:
        raise DataError(f"{path}: {_missing(path, 'image file')}") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot read image (corrupt or not an image): {exc}") from None
    return _checked_rgb(arr, path)


def decode_image(data: bytes, name: str | os.PathLike[str]) -> np.ndarray:
    """:func:`load_image` of a file's bytes (read from a URL, say); ``name`` names it in errors."""
    try:
        with Image.open(io.BytesIO(data)) as raw:
            raw.load()
            arr = to_rgb(ImageOps.exif_transpose(raw), name)
    except _DECODE_ERRORS as exc:
        why = "no known image format" if isinstance(exc, UnidentifiedImageError) else exc
        raise DataError(f"{os.fspath(name)}: cannot read image (corrupt or not an image): {why}") from None
    return _checked_rgb(arr, name)


def to_rgb(image: Image.Image | np.ndarray, name: str | os.PathLike[str] = "image") -> np.ndarray:
    """An image as uint8 ``H x W x 3`` RGB, by one rule for every input (``name`` names it in
    errors):

    * RGB: as it is;
    * 16-bit (and 32-bit integer) grayscale: the high byte, ``v >> 8`` (:func:`eight_bit`),
      then grey to RGB (R = G = B);
    * 8-bit grayscale, palette (``P``: the palette's colours), CMYK, YCbCr, bilevel: PIL's
      conversion to RGB;
    * with an alpha channel (RGBA, LA, PA): the alpha channel is dropped, not composited: the
      colours are taken as stored.

    A numpy array is read as PIL reads it: ``H x W`` uint8 grey, ``H x W`` uint16 16-bit grey,
    ``H x W x 3`` / ``H x W x 4`` uint8 RGB / RGBA (``H x W x 1`` as ``H x W``); other shapes
    and dtypes are a ``ValueError``.
    """
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        ok = (arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16)) or (
            arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8)
        if not ok or 0 in arr.shape:
            raise ValueError(f"expected an H x W (uint8 or uint16) or H x W x 3 / 4 (uint8) image array, "
                             f"got {arr.dtype} {arr.shape}")
        if arr.ndim == 3 and arr.shape[2] == 3:
            return np.ascontiguousarray(arr)
        image = Image.fromarray(np.ascontiguousarray(arr))
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's own conversion clips 16-bit values at 255; the high byte keeps their meaning
        grey = eight_bit(np.asarray(image), Path(os.fspath(name)))
        return np.repeat(grey[:, :, None], 3, axis=2)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.array(rgb, dtype=np.uint8)


def _checked_rgb(arr: np.ndarray, name: str | os.PathLike[str]) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{os.fspath(name)}: image has unexpected shape {arr.shape}")
    return arr


def _missing(path: Path, what: str) -> str:
    """Why ``path`` cannot be opened although it was listed: gone, or a dangling link."""
    if path.is_symlink():
        return f"{what} is a dangling symbolic link (its target {os.readlink(path)} does not exist)"
    return f"{what} does not exist"


def _to_label_dtype(arr: np.ndarray, path: Path) -> np.ndarray:
    """Check an integer label array and convert it to uint8 (or uint16 when needed)."""
    if arr.size == 0:
        raise DataError(f"{path}: label map is empty (shape {arr.shape})")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise DataError(f"{path}: label map contains negative value(s) (minimum {lo})")
    if hi > 65535:
        raise DataError(f"{path}: label map contains value {hi} > 65535")
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        return arr
    return arr.astype(np.uint8 if hi <= 255 else np.uint16)


def load_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label map (``.npy`` 2-D integer array, or a single-channel PNG) as uint8/uint16 HxW.

    The file is decoded by its content, not its name: ``.npy`` bytes are read as an array,
    image bytes as an image, and JPEG (or lossy WebP) bytes are refused, since lossy
    compression changes class ids. PNG labels may be 8-bit grey (``L``), palette (``P``,
    the palette index is the class id) or 16-bit grey (the values themselves). An RGB PNG is
    accepted only if its three channels are identical.
    """
    path = Path(path)
    fmt = file_format(path)
    refuse_lossy(path, fmt, "label map")
    if fmt == "npy" or (fmt is None and path.suffix.lower() == ".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: {_missing(path, 'label file')}") from None
        except _DECODE_ERRORS as exc:
            raise DataError(f"{path}: cannot read .npy label (corrupt or truncated): {exc}") from None
        if not isinstance(arr, np.ndarray):
            raise DataError(f"{path}: .npy label does not hold a single array")
        if arr.ndim != 2:
            raise DataError(f"{path}: .npy label must be 2-D (HxW), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: .npy label must have an integer dtype, got {arr.dtype}")
        return _to_label_dtype(arr, path)

    try:
        with Image.open(path) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)
            mode = im.mode
            arr = np.array(im)
    except FileNotFoundError:
        raise DataError(f"{path}: {_missing(path, 'label file')}") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot read label image (corrupt or not an image): {exc}") from None
    if arr.ndim == 3:
        if mode in ("RGB", "RGBA") and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
            arr[..., 0], arr[..., 2]
        ):
            arr = arr[..., 0]
        else:
            raise DataError(
                f"{path}: label image must be single-channel (class ids), got mode {mode!r} "
                "with differing channels (a colour-coded mask?)"
            )
    if arr.ndim != 2:
        raise DataError(f"{path}: label image has unexpected shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: label image must hold integer class ids, got {arr.dtype}")
    return _to_label_dtype(np.ascontiguousarray(arr), path)


def check_label(
    label: np.ndarray,
    image_shape: tuple[int, ...],
    num_classes: int,
    ignore_index: int,
    label_path: Path,
    image_path: Path,
    note: str = "",
) -> None:
    """Raise :class:`DataError` if ``label`` does not match the image size or has bad values."""
    if tuple(label.shape) != tuple(image_shape[:2]):
        lh, lw = label.shape
        ih, iw = image_shape[:2]
        raise DataError(
            f"{label_path}: label size {lh}x{lw} (HxW) differs from image {image_path} "
            f"size {ih}x{iw} (HxW)"
        )
    counts = np.bincount(label.ravel())
    present = np.flatnonzero(counts)
    bad = present[(present >= num_classes) & (present != ignore_index)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DataError(
            f"{label_path}: label value(s) {shown} >= num_classes={num_classes} "
            f"(and not the ignore index {ignore_index}){note}"
        )


def nearest_like_reference(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """``label`` resized to ``height x width`` by nearest neighbour as OpenCV's ``INTER_NEAREST``
    samples (what the DDPM-Seg reference calls): output pixel ``x`` takes source pixel
    ``floor(x * in / out)``."""
    h, w = label.shape[:2]
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    return np.ascontiguousarray(label[rows[:, None], cols[None, :]])


def fit_label(label: np.ndarray, image_shape: tuple[int, ...], label_path: Path, image_path: Path) -> np.ndarray:
    """``label`` at its image's size: unchanged when the sizes agree; otherwise resized by
    :func:`nearest_like_reference` with a :class:`~ddps_core.errors.DataWarning` naming the
    file (the DDPM-Seg reference resizes every label map the same way, without a word)."""
    ih, iw = int(image_shape[0]), int(image_shape[1])
    if tuple(label.shape) == (ih, iw):
        return label
    lh, lw = label.shape
    warnings.warn(DataWarning(
        f"{label_path}: label size {lh}x{lw} (HxW) differs from image {image_path} size {ih}x{iw} (HxW); "
        "resized to the image's size (nearest neighbour)"), stacklevel=2)
    return nearest_like_reference(label, ih, iw)


# --------------------------------------------------------------------------------------------
# classes.yaml
# --------------------------------------------------------------------------------------------


def read_classes_yaml(path: Path) -> tuple[list[str], int | None]:
    """Parse ``classes.yaml``: a YAML list of names, or a mapping with a ``classes`` list.

    Returns ``(names, num_classes)`` where ``num_classes`` is the optional ``num_classes`` key of
    the mapping form (checked to equal ``len(names)``).
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read classes file: {exc}") from None
    declared = None
    if isinstance(doc, dict):
        if "classes" not in doc:
            raise DataError(f"{path}: expected a list of class names or a mapping with a 'classes' key")
        declared = doc.get("num_classes")
        doc = doc["classes"]
    if not isinstance(doc, list) or not doc:
        raise DataError(f"{path}: 'classes' must be a non-empty list of class names")
    names = []
    for i, name in enumerate(doc):
        if not isinstance(name, (str, int, float)) or isinstance(name, bool):
            raise DataError(f"{path}: class name #{i} is not a string: {name!r}")
        names.append(str(name))
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: duplicate class name(s) {dup}")
    if declared is not None:
        if not isinstance(declared, int) or isinstance(declared, bool) or declared != len(names):
            raise DataError(
                f"{path}: num_classes={declared!r} does not match the {len(names)} class names listed"
            )
    return names, len(names)


def resolve_classes(
    root: Path, num_classes: int | None, ignore_index: int
) -> tuple[int, list[str] | None]:
    """Combine an explicit ``num_classes`` with an optional ``<root>/classes.yaml``."""
    yaml_path = root / "classes.yaml"
    names: list[str] | None = None
    if yaml_path.is_file():
        names, n = read_classes_yaml(yaml_path)
        if num_classes is None:
            num_classes = n
        elif num_classes != n:
            raise DataError(
                f"{yaml_path}: lists {n} classes but num_classes={num_classes} was given"
            )
    if num_classes is None:
        raise DataError(
            f"{yaml_path}: not found, so num_classes must be given explicitly for dataset {root}"
        )
    check_class_settings(num_classes, ignore_index, root)
    return num_classes, names


def check_class_settings(num_classes: int, ignore_index: int, where: Path) -> None:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise DataError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise DataError(f"{where}: ignore_index must be an integer, got {ignore_index!r}")
    if ignore_index < 0:
        raise DataError(f"{where}: ignore_index must not be negative, got {ignore_index}")
    # 0 <= ignore_index < num_classes is allowed: that class id is then the ignored class (a
    # slot of the K classes that is never trained on nor scored; DDPM-Seg's bedroom_28, 0).


# --------------------------------------------------------------------------------------------
# Folder scanning
# --------------------------------------------------------------------------------------------


def path_inside(root: str | os.PathLike[str], entry: str | os.PathLike[str], source: object) -> Path:
    """``root / entry`` for a path that ``source`` (a manifest, a setting) lists relative to
    ``root``. An absolute path, or one whose ``..`` climb out of ``root``, raises
    :class:`DataError` naming ``source`` and the entry; it is never read.

    The check is on the text (symlinks are not followed), so a dataset folder that is a
    symlink keeps working.
    """
    if not isinstance(entry, (str, os.PathLike)):
        raise DataError(f"{source}: path entry {entry!r} is not a path")
    text = os.fspath(entry)
    if not text or "\0" in text:
        raise DataError(f"{source}: path entry {text!r} is empty or holds a NUL byte")
    if os.path.isabs(text):
        raise DataError(f"{source}: path {text!r} is absolute; entries must be relative to {root}")
    norm = os.path.normpath(text)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise DataError(f"{source}: path {text!r} leaves the dataset root {root}")
    return Path(root) / norm


def require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder does not exist")


def scan_by_stem(
    folder: Path, suffixes: Iterable[str], stem_of: Callable[[str], str | None] | None = None
) -> dict[str, Path]:
    """Map stem -> file for the files in ``folder`` with one of ``suffixes`` (case-insensitive).

    Hidden files are skipped. Two files with the same stem (``a.png`` and ``a.jpg``) raise
    :class:`DataError` naming both. ``stem_of`` may derive the id from the file name (returning
    ``None`` skips the file).
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder: {exc}") from None
    for p in entries:
        if p.name.startswith(".") or p.suffix.lower() not in suffixes:
            continue
        if p.is_symlink() and not p.exists():
            raise DataError(f"{p}: {_missing(p, 'file')}")
        if not p.is_file():
            continue
        stem = stem_of(p.name) if stem_of is not None else p.stem
        if stem is None:
            continue
        if stem in found:
            raise DataError(f"{found[stem]} and {p}: duplicate sample id {stem!r} (same stem)")
        found[stem] = p
    return found


# --------------------------------------------------------------------------------------------
# Base reader
# --------------------------------------------------------------------------------------------


class BaseReader:
    """Lazily reading, validating sequence of :class:`Sample` sorted by id.

    Subclasses fill ``self._entries`` (sorted list of ``(id, image_path, label_path | None)``)
    and may override :meth:`_map_label` (raw label -> class ids).
    """

    num_classes: int
    ignore_index: int
    class_names: list[str] | None
    has_labels: bool
    _label_note: str = ""

    def __init__(self) -> None:
        self._entries: list[tuple[str, Path, Path | None]] = []

    @property
    def ids(self) -> list[str]:
        return [e[0] for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self._entries)):
            yield self[i]

    def __getitem__(self, i: int) -> Sample:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"dataset index must be an integer, got {type(i).__name__}")
        n = len(self._entries)
        if not -n <= i < n:
            raise IndexError(f"dataset index {i} out of range for {n} samples")
        sid, image_path, label_path = self._entries[int(i)]
        image = load_image(image_path)
        if label_path is None:
            return Sample(image, None, sid)
        label = self._map_label(load_label(label_path), label_path)
        label = fit_label(label, image.shape[:2], label_path, image_path)
        check_label(
            label, image.shape, self.num_classes, self.ignore_index, label_path, image_path,
            self._label_note,
        )
        return Sample(image, label, sid)

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return raw

    def content_id(self) -> str:
        """16 hex digits naming what the split holds: each sample's id and the bytes of its
        image and label files (not their names or times). Reads every file once."""
        from ddps_core.training import content_id

        return content_id(x for sid, image, label in self._entries
                          for x in (sid.encode(), image, b"" if label is None else label))

    def source_files(self) -> list[Path]:
        """Every file this reader reads: its images and labels (by id), and the class file
        at its root when there is one."""
        files = [p for _, image, label in self._entries for p in (image, label) if p is not None]
        classes = getattr(self, "root", None)
        if classes is not None and (Path(classes) / "classes.yaml").is_file():
            files.append(Path(classes) / "classes.yaml")
        return files

    def _set_entries(self, entries: list[tuple[str, Path, Path | None]], folder: Path) -> None:
        if not entries:
            raise DataError(f"{folder}: split is empty (no image files found)")
        ids = [e[0] for e in entries]
        if len(set(ids)) != len(ids):
            by_id: dict[str, Path] = {}
            for sid, p, _ in entries:
                if sid in by_id:
                    raise DataError(f"{by_id[sid]} and {p}: duplicate sample id {sid!r}")
                by_id[sid] = p
        self._entries = sorted(entries, key=lambda e: e[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, num_classes={self.num_classes})"


# --------------------------------------------------------------------------------------------
# Non-square images
# --------------------------------------------------------------------------------------------


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resampling (pixel centres)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def to_square(
    image: np.ndarray, label: np.ndarray | None, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Make an image (and its label) ``size`` x ``size``: resize, then centre-crop.

    The image is resized so that its SHORT side equals ``size`` (bilinear, antialiased by PIL
    when downscaling), the label with nearest-neighbour sampling on the same pixel grid (so only
    values present in the input label appear). The long side is then CENTRE-CROPPED to
    ``size`` with offset ``(long - size) // 2``.

    We crop rather than pad: padding would insert content (and an ignore / fill region) the
    diffusion model never saw, and shrink the object scale differently for every aspect ratio;
    cropping keeps the pixel scale uniform at the cost of losing the borders of the long side.

    A square input already of size ``size`` is returned unchanged.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if label is not None and tuple(label.shape) != (h, w):
        raise ValueError(f"label shape {label.shape} does not match image shape {(h, w)}")
    if h == size and w == size:
        return image, label
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    if (new_h, new_w) != (h, w):
        resized = Image.fromarray(image, "RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
        img = np.asarray(resized, dtype=np.uint8)
    else:
        img = image
    top, left = (new_h - size) // 2, (new_w - size) // 2
    img = np.ascontiguousarray(img[top : top + size, left : left + size])
    if label is None:
        return img, None
    rows = _nearest_index(new_h, h)[top : top + size]
    cols = _nearest_index(new_w, w)[left : left + size]
    lab = np.ascontiguousarray(label[rows[:, None], cols[None, :]])
    return img, lab


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 ``H x W x 3`` image (or ``H x W`` label) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """Encode an array as ``.npy`` bytes (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
