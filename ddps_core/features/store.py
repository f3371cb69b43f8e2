"""The feature store: DDPM-Seg features of one dataset split at NATIVE resolution, in Zarr v3.

Layout (one Zarr v3 group per split, on local disk or an object store, see below)::

    <store>/zarr.json              group attributes (settings, image ids, array names, labels)
    <store>/t{t}_b{block}/         one float16 array per (timestep, block): (N, C, h, w),
                                   chunk = one image (1, C, h, w), shard = shard_images images,
                                   shard k in the file c.{k}.0.0.0 (see FLAT_KEYS)
    <store>/labels/                optional uint8 / uint16 (N, S, S) squared labels, same sharding
    <store>/done/                  uint8 (N,) completion flags, ONE CHUNK PER SHARD

Features are upsampled on demand: bilinear upsampling (align_corners=False) of one output
pixel is a fixed 4-tap blend of the native map, so :meth:`FeatureStore.pixels` computes the
features of any set of pixels without materialising the ``D x S x S`` float32 map the
reference keeps in RAM (2.2 GB per 256x256 image; the native float16 maps are ~44x smaller).

Durability and resumption
-------------------------
zarr 3.1.6's ``LocalStore`` writes every key (a whole shard file here) to a temporary file
``<key>.<uuid>.partial`` and renames it over the key (``zarr/storage/_local.py``:
``_atomic_write``), so after a SIGKILL a reader never sees a truncated shard under its final
name; a killed write leaves only a stray ``*.partial`` file. It does not fsync. Every write
into a sharded array is a read-modify-write of the whole shard file: the codec pipeline takes
the sharding codec's partial-encode path (``ShardingCodec._encode_partial_single``), which
loads the existing shard file even when the write covers the whole shard. Image-by-image
writes would thus rewrite the shard once per image, and a damaged old shard file (power loss,
or a store without atomic puts) would make the next write fail.

We rely on neither. A writer owns whole shards and writes each shard ONCE: the images of a
shard are computed (in batches) into an in-memory buffer (``shard_images`` x one image's
native features: 16 x 50 MB float16 for the 256 config). Then, in
:meth:`FeatureStore.write_shard`: the shard's ``done`` chunk file is removed, its old data
files and stray temp files are deleted, every array's shard file is written in one
whole-shard write and fsynced, and only then is the shard's chunk of the ``done`` array set
to 1 (its own file, also fsynced). Hence:

* an image is marked done only after its data is durable;
* a crash at any moment leaves each shard either done (data complete) or not done (its
  files, possibly stale or absent, are rewritten as a whole on resume, and stray
  ``*.partial`` temp files of that shard are removed first);
* two workers filling different shards never touch the same file (not even for completion
  flags), so they may run concurrently; never give one shard to two writers;
* the resume granularity is one shard (at most ``shard_images`` images are recomputed).

Shard files of the uncompressed arrays (the float16 features and the labels) are encoded by
:mod:`.shardio` (numpy, no per-chunk Python) and written with its own temp-file + fsync +
rename (for a store too large to stay in the page cache, the image data goes past it with
O_DIRECT, from the page-aligned shard buffers: :func:`.shardio.direct_io_default`); the
result is the byte-identical file zarr would write. Arrays whose metadata that encoder does not reproduce
exactly (every array of a ``compress=True`` store; the zstd labels of stores made before
2026-12-03) are written through zarr as above; :attr:`FeatureStore.zarr_written` names them
with the reason. Either way the folders holding a shard file are fsynced before the shard
is marked done.

The store's metadata is written once, at creation, into a temporary sibling folder that is
renamed into place, so a store folder that exists is always a complete, openable group.
Reopening an existing store (:func:`open_or_create`) requires every recorded setting to match
exactly; a mismatch raises :class:`~ddps_core.errors.ConfigError` naming each differing
attribute with both values (features of different settings are never mixed).

Stores on an object store
-------------------------
A store location may be an fsspec URL (``s3://bucket/features/train.zarr``; see
:mod:`ddps_core.storage`, ``file://`` URLs are local folders). It is then opened through
zarr's ``FsspecStore`` and written without temp files, renames or fsyncs, which an object
store does not have; an object PUT is atomic and durable when it returns instead. Creation
uploads every metadata document of the group and only then the group's own ``zarr.json``,
so a store whose ``zarr.json`` exists is complete. :meth:`FeatureStore.write_shard` deletes
the shard's ``done`` chunk, PUTs each array's whole shard object (encoded by :mod:`.shardio`,
or by zarr for the labels: one PUT each either way), and only after all of them returned
PUTs the ``done`` chunk. Reads go through zarr and fetch whole inner chunks (one image of
one array) by byte range.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore, MemoryStore

from ddps_core import storage
from ddps_core.errors import ConfigError, DataError

from .shardio import DirectIO, ShardLayout, UnsupportedLayout, fsync_dirs, write_files_atomic

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureStore",
    "bilinear_taps",
    "footprint",
    "open_or_create",
    "shard_ranges",
    "upsample_pixels",
]

FORMAT = "ddps-feature-store"
FORMAT_VERSION = 1
DEFAULT_SHARD_IMAGES = 16
# Shard files of the image arrays are named ``c.<shard>.0.0.0`` inside the array's folder,
# not ``c/<shard>/0/0/0``: the default nesting made every shard create (and fsync) three or
# four folders per array, which cost the extraction several percent of the UNet time on a
# 2-core machine. Any Zarr v3 reader follows the encoding recorded in each array's zarr.json,
# and stores made with the nested keys are read and written as they are.
FLAT_KEYS = {"name": "default", "separator": "."}

# Attributes that define the content; reopening requires all of them to be equal.
SETTINGS_KEYS = (
    "format_version",
    "model_id",
    "schedule_id",
    "steps",
    "blocks",
    "noise_seed",
    "noise_id",
    "image_size",
    "image_ids",
    "shard_images",
    "arrays",
    "shapes",
    "labels",
)


# --------------------------------------------------------------------------------------------
# Pure helpers: on-demand bilinear upsampling, footprint
# --------------------------------------------------------------------------------------------


def bilinear_taps(n_in: int, n_out: int, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0, i1`` and weight ``w`` (of ``i1``) of output positions ``dst`` for
    bilinear resizing ``n_in -> n_out`` with align_corners=False (PyTorch's rule):
    ``src = max((dst + 0.5) * (n_in / n_out) - 0.5, 0)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, n_in - 1)``, ``w = src - i0``.

    Computed in float32 like PyTorch's CPU kernel, whose ``scale * (dst + 0.5) - 0.5`` is a
    fused multiply-add (one rounding): the product of two float32 numbers is exact in float64,
    so evaluating it in float64 and rounding once to float32 reproduces its weights bit for bit.
    """
    dst = np.asarray(dst, dtype=np.int64)
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    src = (np.float64(scale) * (dst.astype(np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, w


def upsample_pixels(native: np.ndarray, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Values at output pixels ``(ys, xs)`` of ``native`` (C, h, w) bilinearly upsampled to
    ``size`` x ``size`` (align_corners=False), as float32 ``(n, C)``; a 4-tap blend, equal to
    ``F.interpolate(native, (size, size), mode="bilinear")[:, ys, xs].T`` to float32 rounding."""
    native = np.asarray(native)
    _, h, w = native.shape
    y0, y1, wy = bilinear_taps(h, size, ys)
    x0, x1, wx = bilinear_taps(w, size, xs)
    m = native if native.dtype == np.float32 else native.astype(np.float32)
    wy, wx = wy[:, None], wx[:, None]
    top = m[:, y0, x0].T * (1 - wx) + m[:, y0, x1].T * wx
    bottom = m[:, y1, x0].T * (1 - wx) + m[:, y1, x1].T * wx
    return np.ascontiguousarray(top * (1 - wy) + bottom * wy, dtype=np.float32)


def footprint(shapes: Mapping[str, Sequence[int]], image_size: int, n_images: int = 1) -> dict[str, Any]:
    """Storage of the native float16 features vs. the reference's upsampled float32 ones,
    computed from the shapes ``{name: (C, h, w)}`` alone."""
    values = sum(int(c) * int(h) * int(w) for c, h, w in shapes.values())
    dim = sum(int(c) for c, _, _ in shapes.values())
    native = 2 * values
    upsampled = 4 * dim * int(image_size) ** 2
    return {
        "feature_dim": dim,
        "native_values_per_image": values,
        "native_float16_bytes_per_image": native,
        "upsampled_float32_bytes_per_image": upsampled,
        "ratio": upsampled / native,
        "n_images": int(n_images),
        "native_float16_bytes": native * int(n_images),
        "upsampled_float32_bytes": upsampled * int(n_images),
    }


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(settings)
    out["steps"] = [int(s) for s in out["steps"]]
    out["blocks"] = [int(b) for b in out["blocks"]]
    out["shapes"] = {k: [int(x) for x in v] for k, v in out["shapes"].items()}
    out["image_ids"] = [str(i) for i in out["image_ids"]]
    return out


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_text(stored: Any, requested: Any) -> str:
    """How two attribute values differ (long lists: their lengths or first difference)."""
    if isinstance(stored, list) and isinstance(requested, list) and max(len(stored), len(requested)) > 8:
        if len(stored) != len(requested):
            return f"stored {len(stored)} entries, requested {len(requested)} entries"
        k = next(i for i, (x, y) in enumerate(zip(stored, requested)) if x != y)
        return f"entry {k} differs: stored {stored[k]!r}, requested {requested[k]!r}"
    return f"stored {_short(stored)}, requested {_short(requested)}"


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class FeatureStore:
    """One split's native-resolution features (see the module docstring for the layout).

    Make one with :meth:`create`, :meth:`open` or :func:`open_or_create`.
    """

    def __init__(self, path: str | os.PathLike[str], group: zarr.Group,
                 storage_options: Mapping[str, Any] | None = None):
        #: True for a store behind an fsspec URL (``path`` is then that URL, a str).
        self.remote = storage.is_remote(path)
        self.path: Path | str = os.fspath(path) if self.remote else storage.local_path(path)
        self.storage_options = dict(storage_options or {})
        if self.remote:
            self._fs, self._root = storage.filesystem(self.path, self.storage_options)
        self._group = group
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise DataError(f"{self.path}: not a feature store (group attribute format={attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: feature store format_version {attrs.get('format_version')!r} is not "
                f"supported (expected {FORMAT_VERSION}); delete it and extract again"
            )
        self.attrs = attrs
        self.names: list[str] = list(attrs["arrays"])
        self.shapes: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in attrs["shapes"].items()}
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.image_size = int(attrs["image_size"])
        self.shard_images = int(attrs["shard_images"])
        self.steps: list[int] = list(attrs["steps"])
        self.blocks: list[int] = list(attrs["blocks"])
        lab = attrs.get("labels")
        self.has_labels = lab is not None
        self.num_classes: int | None = None if lab is None else int(lab["num_classes"])
        self.ignore_index: int | None = None if lab is None or lab["ignore_index"] is None else int(lab["ignore_index"])
        try:
            self._arrays = {name: group[name] for name in self.names}
            self._labels = group["labels"] if self.has_labels else None
            self._done = group["done"]
        except KeyError as exc:
            raise DataError(f"{self.path}: feature store is missing array {exc}") from None
        self._layouts, self.zarr_written = self._shard_layouts()
        self._strays: dict[Path, list[Path]] | None = None
        self._direct: DirectIO | None = None  # decided at the first write (_direct_io)

    def _direct_io(self) -> DirectIO:
        """Shard files of a local store too large to stay in the page cache skip it, where
        the OS and file system allow (shardio.direct_io_default; DDPS_DIRECT_IO=0/1).
        Decided once, when first needed: read-only opens never ask."""
        if self._direct is None:
            size = footprint(self.shapes, self.image_size, len(self))["native_float16_bytes"]
            self._direct = DirectIO(nbytes=size)
        return self._direct

    @property
    def direct_io(self) -> bool:
        """Whether this store's shard files are (still) written past the page cache."""
        return self._direct_io().enabled

    def _shard_layouts(self) -> tuple[dict[str, ShardLayout], dict[str, str]]:
        """Per array, the layout :mod:`.shardio` encodes shard files of, read from the
        array's ``zarr.json`` as stored; or, for arrays it does not reproduce exactly (or a
        store that is not a plain local folder), the reason they are written through zarr."""
        layouts: dict[str, ShardLayout] = {}
        fallback: dict[str, str] = {}
        store = self._group.store
        local = not self.remote and isinstance(store, LocalStore) \
            and Path(store.root).resolve() == self.path.resolve()
        for name in [*self.names, *(["labels"] if self.has_labels else [])]:
            if not local and not self.remote:
                fallback[name] = "the store is not a local folder opened at its own path"
                continue
            try:
                if self.remote:
                    with storage.remote_errors(self.path, f"read the metadata of array {name!r}"):
                        text = self._fs.cat_file(f"{self._root}/{name}/zarr.json")
                else:
                    text = (self.path / name / "zarr.json").read_text()
                meta = json.loads(text)
                layouts[name] = ShardLayout.from_metadata(meta)
            except UnsupportedLayout as exc:
                fallback[name] = str(exc)
            except (OSError, ValueError) as exc:
                raise DataError(f"{self.path}: cannot read the metadata of array {name!r}: {exc}") from None
        return layouts, fallback

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str,
        steps: Sequence[int],
        blocks: Sequence[int],
        image_size: int,
        image_ids: Sequence[str],
        shapes: Mapping[str, Sequence[int]],
        noise_seed: int | None = 0,
        noise_id: str | None = None,
        schedule_id: str | None = None,
        shard_images: int = DEFAULT_SHARD_IMAGES,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        compress: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> FeatureStore:
        """Create an empty store at ``path`` (which must not exist; a folder or an fsspec URL).

        ``shapes`` maps every name ``t{t}_b{block}`` (timestep-major, blocks ascending) to its
        native ``(C, h, w)``. ``num_classes`` (None: no labels) adds a ``labels`` array with
        ``ignore_index`` (or None) as its fill value. ``compress`` stores chunks with zstd
        level 1 (float16 activations compress little; off by default for fast reads and
        writes). Labels are uncompressed too unless ``compress``: at most 2 bytes per pixel,
        a fraction of a percent of an image's features, and written without zarr's encoder.
        """
        if storage.is_remote(path):
            settings = cls._settings(
                path, model_id, steps, blocks, image_size, image_ids, shapes, noise_seed, noise_id,
                schedule_id, shard_images, num_classes, ignore_index,
            )
            return cls._create_remote(os.fspath(path), settings, compress, storage_options)
        path = storage.local_path(path)
        settings = cls._settings(
            path, model_id, steps, blocks, image_size, image_ids, shapes, noise_seed, noise_id,
            schedule_id, shard_images, num_classes, ignore_index,
        )
        if path.exists():
            raise ConfigError(f"{path}: feature store already exists (open it, or delete it to start over)")
        docs = cls._documents(settings, compress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for rel, data in docs.items():
                doc = tmp / rel
                doc.parent.mkdir(parents=True, exist_ok=True)
                doc.write_bytes(data)
            os.rename(tmp, path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and path.exists():
                raise ConfigError(f"{path}: feature store already exists (created concurrently)") from None
            raise
        return cls.open(path)

    @classmethod
    def _create_remote(cls, url: str, settings: dict[str, Any], compress: bool,
                       storage_options: Mapping[str, Any] | None) -> FeatureStore:
        """Upload every metadata document, the group's ``zarr.json`` last (its presence is
        what makes the store exist)."""
        fs, root = storage.filesystem(url, storage_options)
        if storage.exists(f"{url.rstrip('/')}/zarr.json", storage_options):
            raise ConfigError(f"{url}: feature store already exists (open it, or delete it to start over)")
        docs = cls._documents(settings, compress)
        head = docs.pop("zarr.json")
        with storage.remote_errors(url, "create the feature store"):
            fs.pipe({f"{root}/{rel}": data for rel, data in docs.items()})
            fs.pipe_file(f"{root}/zarr.json", head)
        return cls.open(url, storage_options=storage_options)

    @staticmethod
    def _settings(
        path, model_id, steps, blocks, image_size, image_ids, shapes, noise_seed, noise_id,
        schedule_id, shard_images, num_classes, ignore_index,
    ) -> dict[str, Any]:
        steps, blocks = [int(s) for s in steps], [int(b) for b in blocks]
        if blocks != sorted(set(blocks)):
            raise ConfigError(f"{path}: blocks must be strictly ascending, got {blocks}")
        names = [f"t{t}_b{b}" for t in steps for b in blocks]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"{path}: steps {steps} must be non-empty and distinct")
        if sorted(shapes) != sorted(names):
            raise ConfigError(f"{path}: shapes have names {sorted(shapes)}, expected {names}")
        ids = [str(i) for i in image_ids]
        if not ids:
            raise ConfigError(f"{path}: a feature store needs at least one image id")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ConfigError(f"{path}: duplicate image ids {dup}")
        if int(shard_images) < 1:
            raise ConfigError(f"{path}: shard_images must be >= 1, got {shard_images}")
        labels = None
        if num_classes is not None:
            if int(num_classes) < 1:
                raise ConfigError(f"{path}: num_classes must be >= 1, got {num_classes}")
            top = max(int(num_classes) - 1, -1 if ignore_index is None else int(ignore_index))
            if top > 65535 or (ignore_index is not None and int(ignore_index) < 0):
                raise ConfigError(f"{path}: class ids up to {top} do not fit in uint16")
            labels = {
                "num_classes": int(num_classes),
                "ignore_index": None if ignore_index is None else int(ignore_index),
                "dtype": "uint8" if top <= 255 else "uint16",
            }
        return _jsonable(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "model_id": str(model_id),
                "schedule_id": schedule_id,
                "steps": steps,
                "blocks": blocks,
                "noise_seed": None if noise_seed is None else int(noise_seed),
                "noise_id": noise_id,
                "image_size": int(image_size),
                "image_ids": ids,
                "shard_images": int(shard_images),
                "arrays": names,
                "shapes": {n: tuple(int(v) for v in shapes[n]) for n in names},
                "labels": labels,
            }
        )

    @staticmethod
    def _documents(settings: dict[str, Any], compress: bool) -> dict[str, bytes]:
        """The store's metadata documents, ``{relative path: bytes}``, as zarr writes them.

        The group is built by zarr in memory and its documents are then written (or uploaded)
        in one go. zarr creating each array on a local folder costs an event-loop round trip
        and a file write per array: a ``tiny32`` store (20 arrays) took 66-71 ms to create
        that way, 21-53 ms this way."""
        docs: dict[str, Any] = {}
        group = zarr.create_group(MemoryStore(docs), attributes=settings, zarr_format=3)
        n, k, S = len(settings["image_ids"]), settings["shard_images"], settings["image_size"]
        compressors = [ZstdCodec(level=1)] if compress else None
        for name in settings["arrays"]:
            c, h, w = settings["shapes"][name]
            group.create_array(
                name, shape=(n, c, h, w), chunks=(1, c, h, w), shards=(k, c, h, w),
                dtype="float16", fill_value=float("nan"), compressors=compressors,
                dimension_names=("image", "channel", "y", "x"), chunk_key_encoding=FLAT_KEYS,
            )
        lab = settings["labels"]
        if lab is not None:
            group.create_array(
                "labels", shape=(n, S, S), chunks=(1, S, S), shards=(k, S, S), dtype=lab["dtype"],
                fill_value=lab["ignore_index"] if lab["ignore_index"] is not None else 0,
                compressors=compressors, dimension_names=("image", "y", "x"),
                chunk_key_encoding=FLAT_KEYS,
            )
        group.create_array(
            "done", shape=(n,), chunks=(k,), dtype="uint8", fill_value=0, compressors=None,
            dimension_names=("image",),
        )
        return {key: buf.to_bytes() for key, buf in docs.items()}

    @staticmethod
    def exists(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether a store (its group ``zarr.json``) exists at ``path`` (a folder or a URL)."""
        if storage.is_remote(path):
            storage.check_protocol(path)  # the error names the store, not its zarr.json
            return storage.exists(storage.join(path, "zarr.json"), storage_options)
        return (storage.local_path(path) / "zarr.json").is_file()

    @classmethod
    def open(cls, path: str | os.PathLike[str], read_only: bool = False,
             storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open an existing store (``DataError`` if it is missing or not a feature store);
        ``path`` is a folder or an fsspec URL (``storage_options`` for its filesystem)."""
        if storage.is_remote(path):
            url = os.fspath(path)
            if not cls.exists(url, storage_options):
                raise DataError(f"{url}: feature store does not exist (no zarr.json)")
            from zarr.storage import FsspecStore

            try:
                zstore = FsspecStore.from_url(url, storage_options=dict(storage_options or {}),
                                              read_only=read_only)
                group = zarr.open_group(store=zstore, mode="r" if read_only else "r+", zarr_format=3)
            except Exception as exc:
                raise DataError(f"{url}: cannot open feature store: {type(exc).__name__}: {exc}") from None
            return cls(url, group, storage_options)
        path = storage.local_path(path)
        if not (path / "zarr.json").is_file():
            raise DataError(f"{path}: feature store does not exist (no zarr.json)")
        try:
            group = zarr.open_group(str(path), mode="r" if read_only else "r+", zarr_format=3)
        except Exception as exc:  # corrupt metadata
            raise DataError(f"{path}: cannot open feature store: {exc}") from None
        return cls(path, group)

    def settings(self) -> dict[str, Any]:
        """The recorded settings that must match for a store to be reused."""
        return {k: self.attrs.get(k) for k in SETTINGS_KEYS}

    # -- geometry -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def feature_dim(self) -> int:
        return sum(c for c, _, _ in self.shapes.values())

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self) / self.shard_images)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Images ``[start, stop)`` of shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"{self.path}: shard {k} out of range 0..{self.num_shards - 1}")
        return k * self.shard_images, min(len(self), (k + 1) * self.shard_images)

    # -- completion -----------------------------------------------------------------------------

    def done_mask(self) -> np.ndarray:
        """Boolean ``(N,)``: images whose features are durably written. An unreadable flag
        chunk (e.g. left empty by a power loss) counts as not done."""
        try:
            return np.asarray(self._done[:]) == 1
        except Exception:
            mask = np.zeros(len(self), dtype=bool)
            for k in range(self.num_shards):
                a, b = self.shard_range(k)
                with contextlib.suppress(Exception):
                    mask[a:b] = np.asarray(self._done[a:b]) == 1
            return mask

    def shard_done(self, k: int) -> bool:
        a, b = self.shard_range(k)
        try:
            return bool((np.asarray(self._done[a:b]) == 1).all())
        except Exception:
            return False

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def n_done(self) -> int:
        return int(self.done_mask().sum())

    # -- writing --------------------------------------------------------------------------------

    def _chunk_file(self, name: str, coords: tuple[int, ...]) -> Path:
        arr = self._done if name == "done" else self._labels if name == "labels" else self._arrays[name]
        return self.path / name / arr.metadata.encode_chunk_key(coords)

    def _chunk_key(self, name: str, coords: tuple[int, ...]) -> str:
        """The object path (inside the store's filesystem) of a remote store's chunk."""
        arr = self._done if name == "done" else self._labels if name == "labels" else self._arrays[name]
        return f"{self._root}/{name}/{arr.metadata.encode_chunk_key(coords)}"

    def _write_shard_remote(self, k: int, features: Mapping[str, np.ndarray],
                            labels: np.ndarray | None) -> None:
        """:meth:`write_shard` on an object store: unmark, one PUT per array, then mark."""
        a, b = self.shard_range(k)
        fs = self._fs

        def delete(key: str) -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)

        names = [*self.names, *(["labels"] if self.has_labels else [])]
        with storage.remote_errors(self.path, f"write shard {k}"):
            delete(self._chunk_key("done", (k,)))
            puts: dict[str, bytes] = {}
            for name in names:
                layout = self._layouts.get(name)
                if layout is None:
                    continue
                key = self._chunk_key(name, (k, 0, 0) if name == "labels" else (k, 0, 0, 0))
                pieces = layout.encode(k, labels if name == "labels" else features[name])
                if pieces is None:  # every image equals the fill value: no object (as zarr)
                    delete(key)
                else:
                    puts[key] = b"".join(pieces)
            if puts:
                fs.pipe(puts)  # one PUT per shard object, issued concurrently
            for name in names:
                if name in self._layouts:
                    continue
                if name == "labels":
                    self._labels[a:b] = np.asarray(labels).astype(self._labels.dtype, copy=False)
                else:
                    self._arrays[name][a:b] = np.asarray(features[name], dtype=np.float16)
            self._done[a:b] = np.ones(b - a, dtype=np.uint8)

    def _stray_partials(self) -> dict[Path, list[Path]]:
        """Temporary files that killed writers left (``<key>.<hex>.partial``, by zarr or by
        :mod:`.shardio`), by the shard file they were meant to become.

        Listed once per store handle, at its first write: the shard files of an array share
        one folder, so looking for them shard by shard would list that folder once per shard.
        Temporary files that appear later (a writer of another handle killed meanwhile) are
        left; they never count as data, and the next handle to write that shard removes them.
        """
        if self._strays is None:
            strays: dict[Path, list[Path]] = {}
            for name in [*self.names, *(["labels"] if self.has_labels else [])]:
                for root, _, filenames in os.walk(self.path / name):
                    for fname in filenames:
                        if fname.endswith(".partial") and fname.count(".") >= 2:
                            key = fname.rsplit(".", 2)[0]
                            strays.setdefault(Path(root) / key, []).append(Path(root) / fname)
            self._strays = strays
        return self._strays

    def write_shard(
        self, k: int, features: Mapping[str, np.ndarray], labels: np.ndarray | None = None
    ) -> None:
        """Write ALL images of shard ``k`` at once, make them durable, then mark them done.

        ``features[name]`` is ``(n_k, C, h, w)`` (cast to float16), ``labels`` ``(n_k, S, S)``
        when the store has labels. The caller must own shard ``k`` (no other writer on it).
        """
        a, b = self.shard_range(k)
        n = b - a
        if set(features) != set(self.names):
            raise ValueError(f"{self.path}: shard {k}: got features {sorted(features)}, expected {self.names}")
        for name in self.names:
            want = (n, *self.shapes[name])
            if tuple(features[name].shape) != want:
                raise ValueError(f"{self.path}: shard {k}: {name} has shape {tuple(features[name].shape)}, expected {want}")
        if self.has_labels:
            S = self.image_size
            if labels is None or tuple(labels.shape) != (n, S, S):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"{self.path}: shard {k}: labels of shape {(n, S, S)} required, got {got}")
        if self.remote:
            self._write_shard_remote(k, features, labels)
            return
        files = [self._chunk_file(name, (k, 0, 0, 0)) for name in self.names]
        if self.has_labels:
            files.append(self._chunk_file("labels", (k, 0, 0)))
        # Start the shard from nothing. zarr reads an existing shard file even when a write
        # covers the whole shard (read-modify-write), so whatever an earlier, killed writer of
        # this shard left (stale data, ``*.partial`` temp files) is removed first; a shard
        # that was done is first unmarked, so it is never "done" with mixed contents.
        self._chunk_file("done", (k,)).unlink(missing_ok=True)
        strays = self._stray_partials()
        for f in files:
            f.unlink(missing_ok=True)
            for stray in strays.pop(f, []):
                stray.unlink(missing_ok=True)
        # One whole-shard write per array. Arrays whose metadata shardio reproduces exactly
        # (the uncompressed features) get their shard file encoded by numpy and written here,
        # one after the other, past the page cache where allowed (more threads would only
        # compete with the forwards for the CPU), then fsynced on the pool, where the waits for the disk
        # overlap. The others (every array of a compressed store, older stores' zstd labels) go through
        # zarr on the pool meanwhile (its encoder costs ~0.5 ms per image per array) and are
        # fsynced after. Then the folders holding the files are fsynced, all at once, so the
        # renames are durable too before the shard is marked done.
        def put_zarr(name: str, path: Path) -> None:
            if name == "labels":
                self._labels[a:b] = np.asarray(labels).astype(self._labels.dtype, copy=False)
            else:
                self._arrays[name][a:b] = np.asarray(features[name], dtype=np.float16)
            _fsync_file(path)

        names = [*self.names, *(["labels"] if self.has_labels else [])]
        by_numpy = []
        for name, path in zip(names, files):
            layout = self._layouts.get(name)
            if layout is not None:
                pieces = layout.encode(k, labels if name == "labels" else features[name])
                if pieces is not None:  # None: every image equals the fill value, no file (as zarr)
                    by_numpy.append((path, pieces))
        by_zarr = [(name, path) for name, path in zip(names, files) if name not in self._layouts]
        with ThreadPoolExecutor(max_workers=8) as pool:
            jobs = [pool.submit(put_zarr, name, path) for name, path in by_zarr]
            write_files_atomic(by_numpy, pool, self._direct_io())
            for job in jobs:
                job.result()
        fsync_dirs(files, self.path)
        self._done[a:b] = np.ones(n, dtype=np.uint8)
        done_file = self._chunk_file("done", (k,))
        _fsync_file(done_file)
        fsync_dirs([done_file], self.path / "done")

    # -- reading --------------------------------------------------------------------------------

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"image index must be an integer, got {type(i).__name__}")
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: image index {i} out of range for {len(self)} images")
        return int(i)

    def native(self, i: int) -> dict[str, np.ndarray]:
        """``{name: float32 (C, h, w)}`` of image ``i`` at native resolution."""
        i = self._check_index(i)
        return {name: np.asarray(self._arrays[name][i], dtype=np.float32) for name in self.names}

    def natives(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """:meth:`native` of each of ``indices``, read with one call per array for every run
        of consecutive indices (a run within a shard reads that shard once instead of once
        per image: ~7x faster per image at the default shard size)."""
        idx = [self._check_index(i) for i in indices]
        out: list[dict[str, np.ndarray]] = []
        k = 0
        while k < len(idx):
            end = k + 1
            while end < len(idx) and idx[end] == idx[end - 1] + 1:
                end += 1
            a, b = idx[k], idx[end - 1] + 1
            block = {name: np.asarray(self._arrays[name][a:b], dtype=np.float32) for name in self.names}
            out.extend({name: block[name][j] for name in self.names} for j in range(b - a))
            k = end
        return out

    @property
    def native_bytes(self) -> int:
        """Bytes of one image's :meth:`native` maps (float32)."""
        return 4 * sum(int(np.prod(shape)) for shape in self.shapes.values())

    def image_features(self, i: int) -> np.ndarray:
        """The reference layout of image ``i``: float32 ``[D, S, S]``, every map upsampled
        bilinearly (align_corners=False) and concatenated in canonical order."""
        S = self.image_size
        maps = [
            F.interpolate(torch.from_numpy(m)[None], size=(S, S), mode="bilinear", align_corners=False)[0]
            for m in self.native(i).values()
        ]
        return torch.cat(maps, dim=0).numpy()

    def pixels(self, i: int, ys: np.ndarray, xs: np.ndarray, native: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """float32 ``[n, D]``: the upsampled features of image ``i`` at pixels ``(ys, xs)``,
        computed as 4-tap blends of the native maps (pass ``native`` to reuse maps read before)."""
        S = self.image_size
        ys, xs = pixel_coords(ys, xs, S)
        maps = self.native(i) if native is None else native
        out = np.empty((ys.size, self.feature_dim), dtype=np.float32)
        c0 = 0
        for name in self.names:
            c = self.shapes[name][0]
            out[:, c0 : c0 + c] = upsample_pixels(maps[name], S, ys, xs)
            c0 += c
        return out

    def label(self, i: int) -> np.ndarray:
        """The squared label map ``(S, S)`` of image ``i`` (uint8 / uint16)."""
        if not self.has_labels:
            raise DataError(f"{self.path}: this feature store has no labels")
        return np.asarray(self._labels[self._check_index(i)])

    # -- reporting ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Sizes: bytes on disk (all files), per done image, and the ratio to the upsampled
        float32 features the reference would hold (``D * S * S * 4`` bytes per image)."""
        disk = storage.size_of(self.path, self.storage_options) if self.remote else _dir_bytes(self.path)
        done = self.n_done()
        fp = footprint(self.shapes, self.image_size, len(self))
        per_image = disk / max(done, 1)
        return {
            "path": str(self.path),
            "n_images": len(self),
            "n_done": done,
            "feature_dim": self.feature_dim,
            "bytes_on_disk": disk,
            "bytes_per_image": per_image,
            "native_float16_bytes_per_image": fp["native_float16_bytes_per_image"],
            "upsampled_float32_bytes_per_image": fp["upsampled_float32_bytes_per_image"],
            "ratio": fp["upsampled_float32_bytes_per_image"] / per_image if done else None,
            "ratio_native": fp["ratio"],
        }

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, {len(self)} images, D={self.feature_dim}, {self.n_done()} done)"


def pixel_coords(ys: Any, xs: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ys, xs)`` as flat int64 arrays, checked to be equally long and inside the image."""
    ys, xs = np.asarray(ys, dtype=np.int64).ravel(), np.asarray(xs, dtype=np.int64).ravel()
    if ys.shape != xs.shape:
        raise ValueError("ys and xs must have the same length")
    if ys.size and (ys.min() < 0 or xs.min() < 0 or ys.max() >= size or xs.max() >= size):
        raise IndexError(f"pixel coordinates outside the {size}x{size} image")
    return ys, xs


def shard_ranges(store: FeatureStore) -> list[tuple[int, int, int]]:
    """``[(shard, start, stop), ...]`` for every shard of ``store``."""
    return [(k, *store.shard_range(k)) for k in range(store.num_shards)]


def open_or_create(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                   **settings: Any) -> FeatureStore:
    """Reopen the store at ``path`` if its recorded settings equal ``settings`` exactly,
    otherwise raise :class:`ConfigError` naming each differing attribute with both values;
    create it when it does not exist. ``settings`` are :meth:`FeatureStore.create`'s keywords
    (e.g. ``extractor.store_settings()`` plus ``image_ids``, ``shard_images``, labels).
    ``path`` is a folder or an fsspec URL (``storage_options`` for its filesystem)."""
    if storage.is_remote(path):
        present = lambda: FeatureStore.exists(path, storage_options)  # noqa: E731
    else:
        path = storage.local_path(path)
        present = path.exists
    if not present():
        try:
            return FeatureStore.create(path, storage_options=storage_options, **settings)
        except ConfigError:
            if not present():
                raise
            # created by a concurrent worker: fall through and compare
    store = FeatureStore.open(path, storage_options=storage_options)
    settings = dict(settings)
    settings.pop("compress", None)
    want = FeatureStore._settings(
        path,
        settings.pop("model_id"),
        settings.pop("steps"),
        settings.pop("blocks"),
        settings.pop("image_size"),
        settings.pop("image_ids"),
        settings.pop("shapes"),
        settings.pop("noise_seed", 0),
        settings.pop("noise_id", None),
        settings.pop("schedule_id", None),
        settings.pop("shard_images", DEFAULT_SHARD_IMAGES),
        settings.pop("num_classes", None),
        settings.pop("ignore_index", None),
    )
    if settings:
        raise TypeError(f"unknown feature store settings {sorted(settings)}")
    have = store.settings()
    diffs = [k for k in SETTINGS_KEYS if have.get(k) != want.get(k)]
    if diffs:
        lines = "; ".join(f"{k}: {_diff_text(have.get(k), want.get(k))}" for k in diffs)
        raise ConfigError(
            f"{path}: existing feature store was made with different settings ({lines}); "
            "delete it or choose another output path"
        )
    return store
