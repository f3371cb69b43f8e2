"""The feature store: DDPM-Seg features of one dataset split at NATIVE resolution, in Zarr v3.

Layout (one Zarr v3 group per split, on local disk or an object store, see below)::

    <store>/zarr.json         group attributes: the settings, image ids, feature names and shapes
    <store>/features/         float16 (N, V): row i holds image i's features, every (timestep,
                              block) map flattened in canonical order (the names of the ``arrays``
                              attribute; map ``name`` is ``row[start:stop].reshape(C, h, w)``,
                              ``[start, stop]`` in the array's ``offsets`` attribute); inner
                              chunk = one image (1, V), shard = ``shard_images`` images, shard
                              k in the file ``c.<k>.0``
    <store>/labels/           optional uint8 / uint16 (N, S, S) squared labels, same sharding
    <store>/done/             uint64 (num_shards, 5): shard k's completion record, ONE FILE PER
                              SHARD (``c.<k>.0``, with zarr's CRC32C): done flag, CRC32C and
                              file size of the shard's features, then of its labels
    <store>/writer.lock       the writer lock (:mod:`.lock`)

Features are upsampled on demand: bilinear upsampling (align_corners=False) of one output
pixel is a fixed 4-tap blend of the native map, so :meth:`FeatureStore.pixels` computes the
features of any set of pixels without materialising the ``D x S x S`` float32 map the
reference keeps in RAM (2.2 GB per 256x256 image; the native float16 maps are ~44x smaller).

Why one features array and not one array per (timestep, block): every reader reads all maps
of an image (:meth:`native`, :meth:`natives`), and zarr's cost is per inner chunk. With one
array per map (18 for ``tiny32``) zarr encodes 18 chunks per image: writing 128 images costs
0.45-0.65 s of CPU against 0.09-0.13 s as one array, and reading one image's maps 20 ms
against 2.2 ms (zarr 3.1 on a 2-core machine, medians of 5-15 runs). An image is
still one inner chunk, so reading it never decodes its whole shard (the 256 configuration
has ~50 MB per image). The arrays are written with ``write_empty_chunks`` on (every chunk
of a shard is written: no per-chunk comparison with the fill value, which cost more than
the encoding, and a shard file's size depends only on what it holds).

Durability and resumption
-------------------------
A writer owns whole shards and writes each shard ONCE: the images of a shard are computed
(in batches) into an in-memory buffer (``shard_images`` x one image's native features: 16 x
50 MB float16 for the 256 config). Then, in :meth:`FeatureStore.write_shard`: the shard's
record file is removed, its data files are removed (zarr reads an existing shard file before
rewriting it, and a damaged one would make the write fail), the shard is written through
zarr (``features[a:b] = block``; one file per array, which zarr's local store writes to a
temporary file renamed into place), the files and their folders are fsynced, and only then
is the shard's record written (CRC32C and size of what was written) and fsynced. Hence:

* an image is marked done only after its data is durable;
* a crash at any moment leaves each shard either done (data complete) or not done (its
  files, possibly stale or absent, are rewritten as a whole on resume);
* two workers filling different shards never touch the same file (not even for completion
  records), so they may run concurrently; never give one shard to two writers;
* the resume granularity is one shard (at most ``shard_images`` images are recomputed).

Temporary files of killed writers are removed when the next extraction run takes the
store's writer lock (:func:`open_or_create`): no writer of the store is running then, so
anything in an array's folder that is neither its metadata nor one of its chunk files is
such a leftover.

Health
------
:meth:`FeatureStore.check` compares each done shard's files with the sizes recorded when
it became durable (one directory listing per array): a missing or truncated file is found
without reading data. :meth:`FeatureStore.verify` also reads every done shard back and
compares the CRC32C of its values. Opening a store read-only (for training, labelling,
evaluation) runs :meth:`check` and raises a :class:`~ddps_core.errors.DataError` naming the
store and the shard; a read that fails later (a file damaged after the open) raises the same
kind of error. Reopening for extraction (:func:`open_or_create`) marks damaged shards not
done, so that the run re-extracts exactly those.

The checksum is of the shard's values as written (the float16 block's bytes, and the
labels'), computed from the buffer in memory (no read-back) and kept in the shard's own
record file, written once with the completion flag: writers of different shards never share
a file, and :meth:`verify` checks what a reader gets whatever the encoding (compressed or
not, local or remote). zarr's CRC32C codec on every inner chunk was not used: it would add a
codec to every image read and written, and still need a per-shard record to find a deleted
file. zarr already checks the CRC32C of each shard's index, so a truncated or torn shard file
fails on read (and is then named by the store's error).

Reopening an existing store (:func:`open_or_create`) requires every recorded setting to match
exactly; a mismatch raises :class:`~ddps_core.errors.ConfigError` naming each differing
attribute with both values (features of different settings are never mixed).

Stores on an object store
-------------------------
A store location may be an fsspec URL (``s3://bucket/features/train.zarr``; see
:mod:`ddps_core.storage`, ``file://`` URLs are local folders). It is then opened through
zarr's ``FsspecStore``; an object PUT is atomic and durable when it returns, so there are no
temporary files, renames or fsyncs, and the order of the steps above is kept: the record
object is deleted, each array's shard object PUT, and the record PUT only after they
returned. Creation uploads every metadata document of the group and only then the group's
own ``zarr.json``, so a store whose ``zarr.json`` exists is complete. Reads fetch whole inner
chunks (one image) by byte range.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import MemoryStore

from ddps_core import storage
from ddps_core.errors import ConfigError, DataError

from .lock import StoreLock

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureStore",
    "ShardDamage",
    "bilinear_taps",
    "footprint",
    "image_index",
    "open_or_create",
    "shard_ranges",
    "upsample_pixels",
]

FORMAT = "ddps-feature-store"
FORMAT_VERSION = 2
DEFAULT_SHARD_IMAGES = 16
# Chunk files are named ``c.<k>.0`` inside the array's folder, not ``c/<k>/0``: one folder per
# array holds every shard file, so a shard write creates (and fsyncs) no folder, and one
# listing gives every shard file's size (FeatureStore.check).
FLAT_KEYS = {"name": "default", "separator": "."}
# Fields of a shard's completion record (the ``done`` array's row).
RECORD = ("done", "features_crc32c", "features_nbytes", "labels_crc32c", "labels_nbytes")
# verify() reads done shards back in pieces of at most this many bytes (at least one image).
VERIFY_BYTES = 64 << 20

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
    "inputs_id",
    "shard_images",
    "arrays",
    "shapes",
    "labels",
)


# --------------------------------------------------------------------------------------------
# Pure helpers: on-demand bilinear upsampling, footprint
# --------------------------------------------------------------------------------------------


def image_index(i: int, n: int, where: Any) -> int:
    """``i`` as an image index of a source of ``n`` images at ``where``: an integer (not a
    bool) in ``[0, n)``, else a TypeError / IndexError naming the source."""
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"image index must be an integer, got {type(i).__name__}")
    if not 0 <= i < n:
        raise IndexError(f"{where}: image index {i} out of range for {n} images")
    return int(i)


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


def _readonly(a: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(a).view()
    view.flags.writeable = False
    return view


def _crc32c(a: np.ndarray, crc: int = 0) -> int:
    """CRC32C of ``a``'s bytes in C order (continuing ``crc``)."""
    return int(google_crc32c.extend(crc, _readonly(a)))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@dataclass(frozen=True)
class ShardDamage:
    """A done shard whose files do not hold what was recorded when it became durable."""

    shard: int
    start: int
    stop: int
    reason: str

    def __str__(self) -> str:
        return f"shard {self.shard} (images {self.start}-{self.stop - 1}): {self.reason}"


class FeatureStore:
    """One split's native-resolution features (see the module docstring for the layout).

    Make one with :meth:`create`, :meth:`open` or :func:`open_or_create`.
    """

    def __init__(self, path: str | os.PathLike[str], group: zarr.Group,
                 storage_options: Mapping[str, Any] | None = None, token: str | None = None):
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
        #: ``{name: (start, stop)}``: where each map lies in an image's row of ``features``.
        self.offsets = _offsets(self.names, self.shapes)
        #: Values (float16) per image: the width of the ``features`` array.
        self.values_per_image = sum(stop - start for start, stop in self.offsets.values())
        try:
            features = group["features"]
            labels = group["labels"] if self.has_labels else None
            self._done = group["done"]
        except KeyError as exc:
            raise DataError(f"{self.path}: feature store is missing array {exc}") from None
        if tuple(features.shape) != (len(self), self.values_per_image) \
                or tuple(self._done.shape) != (self.num_shards, len(RECORD)):
            raise DataError(f"{self.path}: feature store arrays do not match its attributes "
                            f"(features {features.shape}, done {self._done.shape})")
        config = {"write_empty_chunks": True}
        self._features = features.with_config(config)
        self._labels = None if labels is None else labels.with_config(config)
        self._lock = StoreLock(self.path, self._fs, self._root) if self.remote else StoreLock(self.path)
        self._token = token
        #: Shards found damaged and marked not done when the store was reopened for writing
        #: (:func:`open_or_create`).
        self.repaired: list[ShardDamage] = []

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
        inputs_id: str | None = None,
        compress: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> FeatureStore:
        """Create an empty store at ``path`` (which must not exist; a folder or an fsspec URL)
        and take its writer lock for this process (:mod:`.lock`).

        ``shapes`` maps every name ``t{t}_b{block}`` (timestep-major, blocks ascending) to its
        native ``(C, h, w)``. ``num_classes`` (None: no labels) adds a ``labels`` array with
        ``ignore_index`` (or None) as its fill value. ``compress`` stores chunks with zstd
        level 1 (float16 activations compress little; off by default for fast reads and
        writes). ``inputs_id``: the content id of the images and labels the store is for (a
        reader's ``content_id()``): a store whose images or labels changed under the same ids
        is not reopened as if it held their features.
        """
        settings = cls._settings(
            path, model_id, steps, blocks, image_size, image_ids, shapes, noise_seed, noise_id,
            schedule_id, shard_images, num_classes, ignore_index, inputs_id,
        )
        if storage.is_remote(path):
            cls._create_remote(os.fspath(path), settings, compress, storage_options)
        else:
            path = storage.local_path(path)
            cls._create_local(path, settings, compress)
        store = cls.open(path, storage_options=storage_options)
        store._token = store._lock.acquire()[0]
        return store

    @classmethod
    def _create_local(cls, path: Path, settings: dict[str, Any], compress: bool) -> None:
        """Write the metadata into a temporary sibling folder renamed into place: a store
        folder that exists is a complete, openable group."""
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

    @classmethod
    def _create_remote(cls, url: str, settings: dict[str, Any], compress: bool,
                       storage_options: Mapping[str, Any] | None) -> None:
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

    @staticmethod
    def _settings(
        path, model_id, steps, blocks, image_size, image_ids, shapes, noise_seed, noise_id,
        schedule_id, shard_images, num_classes, ignore_index, inputs_id=None,
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
                "inputs_id": None if inputs_id is None else str(inputs_id),
                "shard_images": int(shard_images),
                "arrays": names,
                "shapes": {n: tuple(int(v) for v in shapes[n]) for n in names},
                "labels": labels,
            }
        )

    @staticmethod
    def _documents(settings: dict[str, Any], compress: bool) -> dict[str, bytes]:
        """The store's metadata documents, ``{relative path: bytes}``, made by zarr (in a
        ``MemoryStore``) so that creation can write them in the order that makes it atomic:
        into a folder renamed into place, or uploaded with the group's document last."""
        docs: dict[str, Any] = {}
        group = zarr.create_group(MemoryStore(docs), attributes=settings, zarr_format=3)
        n, k, S = len(settings["image_ids"]), settings["shard_images"], settings["image_size"]
        compressors = [ZstdCodec(level=1)] if compress else None
        offsets = _offsets(settings["arrays"], settings["shapes"])
        width = sum(stop - start for start, stop in offsets.values())
        group.create_array(
            "features", shape=(n, width), chunks=(1, width), shards=(k, width), dtype="float16",
            fill_value=float("nan"), compressors=compressors, dimension_names=("image", "value"),
            chunk_key_encoding=FLAT_KEYS,
            attributes={"offsets": {name: list(v) for name, v in offsets.items()},
                        "shapes": settings["shapes"]},
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
            "done", shape=(math.ceil(n / k), len(RECORD)), chunks=(1, len(RECORD)), dtype="uint64",
            fill_value=0, compressors=[Crc32cCodec()], dimension_names=("shard", "field"),
            chunk_key_encoding=FLAT_KEYS, attributes={"fields": list(RECORD)},
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
             storage_options: Mapping[str, Any] | None = None, *, token: str | None = None,
             check: bool | None = None) -> FeatureStore:
        """Open an existing store (``DataError`` if it is missing or not a feature store);
        ``path`` is a folder or an fsspec URL (``storage_options`` for its filesystem).

        ``check`` (default: ``read_only``): run :meth:`check` and raise a ``DataError`` naming
        the store and the first damaged shard; the default checks every store opened to be
        read (training, labelling), not the ones opened to be written (their extraction
        redoes damaged shards). ``token``: the writer lock's token of the extraction run this
        handle writes for (a shard writer in another process than the run's planning step;
        see :mod:`.lock`); without it, a writable handle's writes take the lock for this
        process (refused if another process holds it).
        """
        group = cls._open_group(path, read_only, storage_options)
        store = cls(path if storage.is_remote(path) else storage.local_path(path), group,
                    storage_options, token)
        if read_only if check is None else check:
            store.raise_if_damaged()
        return store

    @staticmethod
    def _open_group(path: str | os.PathLike[str], read_only: bool,
                    storage_options: Mapping[str, Any] | None) -> zarr.Group:
        mode = "r" if read_only else "r+"
        if storage.is_remote(path):
            url = os.fspath(path)
            if not FeatureStore.exists(url, storage_options):
                raise DataError(f"{url}: feature store does not exist (no zarr.json)")
            from zarr.storage import FsspecStore

            try:
                zstore = FsspecStore.from_url(url, storage_options=dict(storage_options or {}),
                                              read_only=read_only)
                return zarr.open_group(store=zstore, mode=mode, zarr_format=3)
            except Exception as exc:
                raise DataError(f"{url}: cannot open feature store: {_one_line(exc)}") from None
        path = storage.local_path(path)
        if not (path / "zarr.json").is_file():
            raise DataError(f"{path}: feature store does not exist (no zarr.json)")
        try:
            return zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as exc:  # corrupt metadata
            raise DataError(f"{path}: cannot open feature store: {_one_line(exc)}") from None

    def settings(self) -> dict[str, Any]:
        """The recorded settings that must match for a store to be reused."""
        return {k: self.attrs.get(k) for k in SETTINGS_KEYS}

    # -- the writer lock --------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """The writer lock's token this handle writes under (None before its first write,
        for a handle opened without one): pass it to the run's shard writers in other
        processes (``FeatureStore.open(path, token=...)``)."""
        return self._token

    def lock_holder(self) -> str | None:
        """Who holds the store's writer lock, as text (None: nobody)."""
        holder = self._lock.holder()
        return None if holder is None else str(holder)

    def release(self) -> bool:
        """Give the store's writer lock back, if this process holds it (the end of an
        extraction run; a process that ends gives it back too). Returns whether it did."""
        return self._lock.release()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def authorize(self) -> None:
        """Raise a :class:`DataError` unless this handle may write now (see :meth:`open`'s
        ``token``); a handle without a token takes the lock for this process if it is free."""
        self._token = self._lock.authorize(self._token)

    def _remove_leftovers(self) -> list[str]:
        """Delete what killed writers left in the arrays' folders (temporary files): every
        file that is neither the array's ``zarr.json`` nor one of its chunk files. Only safe
        while no writer runs: called when an extraction run takes the lock."""
        if self.remote:
            return []  # objects are PUT whole: no temporary objects
        removed = []
        for name in self._arrays():
            folder = self.path / name
            keep = {"zarr.json"} | {self._key(name, k).split("/", 1)[1] for k in range(self.num_shards)}
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    if entry.name not in keep:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(entry.path)
                        removed.append(f"{name}/{entry.name}")
        return removed

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

    def _arrays(self) -> dict[str, zarr.Array]:
        out = {"features": self._features, "done": self._done}
        if self._labels is not None:
            out["labels"] = self._labels
        return out

    def _key(self, name: str, k: int) -> str:
        """The store-relative key of shard (or record) ``k``'s file of array ``name``."""
        arr = self._arrays()[name]
        return f"{name}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"

    # -- completion -----------------------------------------------------------------------------

    def _records(self) -> np.ndarray:
        """uint64 ``(num_shards, len(RECORD))``: the completion records; an unreadable one
        (e.g. left torn by a power loss) reads as zeros, not done."""
        try:
            return np.asarray(self._done[:], dtype=np.uint64)
        except Exception:
            out = np.zeros((self.num_shards, len(RECORD)), dtype=np.uint64)
            for k in range(self.num_shards):
                with contextlib.suppress(Exception):
                    out[k] = np.asarray(self._done[k], dtype=np.uint64)
            return out

    def content_id(self) -> str:
        """16 hex digits naming what the store holds: its settings and every shard's record
        (done, and the CRC32C and size of the features and labels written). Equal ids: equal
        features and labels; no data is read."""
        head = json.dumps(self.settings(), sort_keys=True, default=str).encode()
        return hashlib.sha256(head + np.ascontiguousarray(self._records()).tobytes()).hexdigest()[:16]

    def _shard_mask(self, records: np.ndarray | None = None) -> np.ndarray:
        records = self._records() if records is None else records
        return records[:, 0] == 1

    def done_mask(self) -> np.ndarray:
        """Boolean ``(N,)``: images whose features are durably written."""
        mask = self._shard_mask()
        return np.repeat(mask, self.shard_images)[: len(self)]

    def shard_done(self, k: int) -> bool:
        self.shard_range(k)
        try:
            return bool(np.asarray(self._done[k])[0] == 1)
        except Exception:
            return False

    def is_complete(self) -> bool:
        return bool(self._shard_mask().all())

    def n_done(self) -> int:
        return int(self.done_mask().sum())

    # -- health ---------------------------------------------------------------------------------

    def _file_sizes(self, name: str) -> dict[str, int]:
        """``{file name: bytes}`` of the files in array ``name``'s folder."""
        if self.remote:
            with storage.remote_errors(self.path, f"list the {name} array"):
                folder = f"{self._root}/{name}"
                # zarr writes through its own filesystem instance: this one's listings may be stale
                self._fs.invalidate_cache(folder)
                try:
                    entries = self._fs.ls(folder, detail=True)
                except FileNotFoundError:
                    return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                    for e in entries if e.get("type") != "directory"}
        try:
            with os.scandir(self.path / name) as it:
                return {e.name: e.stat().st_size for e in it if e.is_file(follow_symlinks=False)}
        except FileNotFoundError:
            return {}

    def _data_arrays(self) -> list[tuple[str, int, int]]:
        """``(name, crc field, size field)`` of the arrays a shard record covers."""
        out = [("features", 1, 2)]
        if self.has_labels:
            out.append(("labels", 3, 4))
        return out

    def check(self, records: np.ndarray | None = None) -> list[ShardDamage]:
        """Done shards whose files are missing or not of the size recorded when they became
        durable (one listing per array, no data read)."""
        records = self._records() if records is None else records
        sizes = {name: self._file_sizes(name) for name, _, _ in self._data_arrays()}
        damaged = []
        for k in np.flatnonzero(self._shard_mask(records)):
            k = int(k)
            for name, _, size_field in self._data_arrays():
                key = self._key(name, k)
                have = sizes[name].get(key.split("/", 1)[1])
                want = int(records[k, size_field])
                if have is None:
                    damaged.append(ShardDamage(k, *self.shard_range(k), f"file {key} is missing"))
                    break
                if have != want:
                    damaged.append(ShardDamage(k, *self.shard_range(k),
                                               f"file {key} has {have} bytes, {want} were written"))
                    break
        return damaged

    def verify(self, repair: bool = False) -> list[ShardDamage]:
        """Every done shard that does not read back as written: :meth:`check`, then each
        remaining done shard read in full and its CRC32C compared with its record.

        ``repair``: mark the damaged shards not done (this handle must be allowed to write:
        see :meth:`open`), so that the next extraction re-extracts them."""
        records = self._records()
        damaged = {d.shard: d for d in self.check(records)}
        row_bytes = 2 * self.values_per_image
        step = max(1, VERIFY_BYTES // max(row_bytes, 1))
        for k in np.flatnonzero(self._shard_mask(records)):
            k = int(k)
            if k in damaged:
                continue
            a, b = self.shard_range(k)
            for name, crc_field, _ in self._data_arrays():
                arr = self._arrays()[name]
                try:
                    crc = 0
                    for i in range(a, b, step):
                        crc = _crc32c(np.asarray(arr[i:min(b, i + step)]), crc)
                except Exception as exc:
                    damaged[k] = ShardDamage(k, a, b, f"file {self._key(name, k)} cannot be read "
                                                      f"({_one_line(exc)})")
                    break
                if crc != int(records[k, crc_field]):
                    damaged[k] = ShardDamage(k, a, b, f"file {self._key(name, k)} holds other values "
                                                      "than were written (CRC32C differs)")
                    break
        found = [damaged[k] for k in sorted(damaged)]
        if repair and found:
            self.unmark([d.shard for d in found])
        return found

    def raise_if_damaged(self) -> None:
        """:meth:`check`, raising one :class:`DataError` line naming the store and the first
        damaged shard."""
        damaged = self.check()
        if damaged:
            more = f" (and {len(damaged) - 1} more damaged shards)" if len(damaged) > 1 else ""
            raise DataError(f"{self.path}: feature store damaged: {damaged[0]}{more}; "
                            "run the extraction again to re-extract it")

    def unmark(self, shards: Sequence[int]) -> None:
        """Mark ``shards`` not done (their record files are deleted; the data files are
        rewritten whole when the shards are extracted again)."""
        self.authorize()
        with self._remote_errors("mark shards not done"):
            for k in shards:
                self.shard_range(int(k))
                self._delete(self._key("done", int(k)))
            if not self.remote:
                _fsync(self.path / "done")

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _remote_errors(self, what: str) -> Iterator[None]:
        if self.remote:
            with storage.remote_errors(self.path, what):
                yield
        else:
            yield

    def _delete(self, key: str) -> None:
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(f"{self._root}/{key}")
        else:
            (self.path / key).unlink(missing_ok=True)

    def _size(self, key: str) -> int:
        if self.remote:
            self._fs.invalidate_cache(f"{self._root}/{key}")  # written through zarr's own instance
            return int(self._fs.size(f"{self._root}/{key}"))
        return (self.path / key).stat().st_size

    def feature_views(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: (n, C, h, w) view}`` of a ``(n, values_per_image)`` block in this store's
        layout (views share the block's memory: writing them fills the block)."""
        n = block.shape[0]
        return {name: block[:, a:b].reshape(n, *self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def _as_block(self, k: int, features: Mapping[str, np.ndarray] | np.ndarray, n: int) -> np.ndarray:
        """Shard ``k``'s features as a C-contiguous float16 ``(n, values_per_image)`` block:
        ``features`` itself when it is one, the block that the maps are views of when they
        are (:meth:`feature_views`), else the maps copied into a new block."""
        V = self.values_per_image
        if not isinstance(features, Mapping):
            block = np.asarray(features)
            if block.shape != (n, V):
                raise ValueError(f"{self.path}: shard {k}: features block of shape {block.shape}, expected {(n, V)}")
            return np.ascontiguousarray(block, dtype=np.float16)
        if set(features) != set(self.names):
            raise ValueError(f"{self.path}: shard {k}: got features {sorted(features)}, expected {self.names}")
        for name in self.names:
            want = (n, *self.shapes[name])
            if tuple(features[name].shape) != want:
                raise ValueError(f"{self.path}: shard {k}: {name} has shape {tuple(features[name].shape)}, expected {want}")
        base = getattr(features[self.names[0]], "base", None)
        if isinstance(base, np.ndarray) and base.shape == (n, V) and base.dtype == np.float16 \
                and base.flags.c_contiguous and all(
                    isinstance(view := features[name], np.ndarray) and view.base is base
                    and view.ctypes.data == base.ctypes.data + 2 * a
                    and view.strides == (2 * V, *np.empty(self.shapes[name], np.float16).strides)
                    for name, (a, _) in self.offsets.items()):
            return base
        block = np.empty((n, V), dtype=np.float16)
        for name, view in self.feature_views(block).items():
            view[...] = np.asarray(features[name])
        return block

    def write_shard(self, k: int, features: Mapping[str, np.ndarray] | np.ndarray,
                    labels: np.ndarray | None = None) -> None:
        """Write ALL images of shard ``k`` at once, make them durable, then mark them done.

        ``features`` is ``{name: (n_k, C, h, w)}`` (cast to float16) or the shard's
        ``(n_k, values_per_image)`` float16 block (:meth:`feature_views`); ``labels`` is
        ``(n_k, S, S)`` when the store has labels. The caller must own shard ``k`` (no other
        writer on it), and the handle must be allowed to write (:meth:`open`).
        """
        a, b = self.shard_range(k)
        n = b - a
        block = self._as_block(k, features, n)
        lab = None
        if self.has_labels:
            S = self.image_size
            if labels is None or tuple(labels.shape) != (n, S, S):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"{self.path}: shard {k}: labels of shape {(n, S, S)} required, got {got}")
            lab = np.ascontiguousarray(labels, dtype=self._labels.dtype)
        self.authorize()
        data = [("features", self._features, block)] + ([("labels", self._labels, lab)] if lab is not None else [])
        record = np.zeros(len(RECORD), dtype=np.uint64)
        record[0] = 1
        with self._remote_errors(f"write shard {k}"):
            # Start the shard from nothing: unmarked first (never done with mixed contents),
            # then its old files removed (zarr would read them before rewriting them).
            self._delete(self._key("done", k))
            for name, _, _ in data:
                self._delete(self._key(name, k))
            for (name, arr, values), (_, crc_field, size_field) in zip(data, self._data_arrays()):
                arr[a:b] = values
                record[crc_field] = _crc32c(values)
                record[size_field] = self._size(self._key(name, k))
            if not self.remote:  # the data and its renames durable before the record exists
                for name, _, _ in data:
                    _fsync(self.path / self._key(name, k))
                for name, _, _ in data:
                    _fsync(self.path / name)
            self._done[k] = record
            if not self.remote:
                _fsync(self.path / self._key("done", k))
                _fsync(self.path / "done")

    # -- reading --------------------------------------------------------------------------------

    def _check_index(self, i: int) -> int:
        return image_index(i, len(self), self.path)

    @contextlib.contextmanager
    def _reading(self, a: int, b: int, name: str = "features") -> Iterator[None]:
        """Turn a failing read of images ``[a, b)`` into one DataError naming the store, the
        shard and its file."""
        try:
            yield
        except DataError:
            raise
        except Exception as exc:
            k = a // self.shard_images
            raise DataError(f"{self.path}: feature store damaged: shard {k} (images "
                            f"{k * self.shard_images}-{min(len(self), (k + 1) * self.shard_images) - 1}): "
                            f"file {self._key(name, k)} cannot be read ({_one_line(exc)}); "
                            "run the extraction again to re-extract it") from None

    def _split(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """One image's maps (float32 views of one array) from its float16 row."""
        row = row.astype(np.float32)
        return {name: row[a:b].reshape(self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def native(self, i: int) -> dict[str, np.ndarray]:
        """``{name: float32 (C, h, w)}`` of image ``i`` at native resolution."""
        i = self._check_index(i)
        with self._reading(i, i + 1):
            row = self._features[i]
        return self._split(np.asarray(row))

    def natives(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """:meth:`native` of each of ``indices``, read with one call for every run of
        consecutive indices within a shard (zarr then reads that shard's index once)."""
        idx = [self._check_index(i) for i in indices]
        out: list[dict[str, np.ndarray]] = []
        k = 0
        while k < len(idx):
            end = k + 1
            while end < len(idx) and idx[end] == idx[end - 1] + 1 \
                    and idx[end] // self.shard_images == idx[k] // self.shard_images:
                end += 1
            a, b = idx[k], idx[end - 1] + 1
            with self._reading(a, b):
                rows = np.asarray(self._features[a:b])
            out.extend(self._split(row) for row in rows)
            k = end
        return out

    @property
    def native_bytes(self) -> int:
        """Bytes of one image's :meth:`native` maps (float32)."""
        return 4 * self.values_per_image

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
        i = self._check_index(i)
        with self._reading(i, i + 1, "labels"):
            return np.asarray(self._labels[i])

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


def _offsets(names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    """``{name: (start, stop)}`` of each map in an image's row, in the order of ``names``."""
    out, at = {}, 0
    for name in names:
        size = math.prod(int(v) for v in shapes[name])
        out[name] = (at, at + size)
        at += size
    return out


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
    """The planning step of an extraction run: take the store's writer lock for this process
    (or join it when a process this one descends from holds it; a :class:`DataError` naming
    the holder when another extraction holds it), then reopen the store at ``path`` if its
    recorded settings equal ``settings`` exactly, otherwise raise :class:`ConfigError` naming
    each differing attribute with both values; create it when it does not exist.

    On reopening, the leftovers of killed writers are removed (when the lock was newly
    taken: no writer of the store runs then) and damaged shards (:meth:`FeatureStore.check`)
    are marked not done, listed in the returned store's ``repaired``, so that the run
    re-extracts exactly those. ``settings`` are :meth:`FeatureStore.create`'s keywords (e.g.
    ``extractor.store_settings()`` plus ``image_ids``, ``shard_images``, labels). ``path`` is
    a folder or an fsspec URL (``storage_options`` for its filesystem). The returned store's
    :attr:`~FeatureStore.token` is the run's; the lock is held until
    :meth:`FeatureStore.release` or the end of the process.
    """
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
    if not FeatureStore.exists(path, storage_options):  # a folder that is not a store: left alone
        raise DataError(f"{path}: not a feature store (no zarr.json); delete it or choose another output path")
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
        settings.pop("inputs_id", None),
    )
    if settings:
        raise TypeError(f"unknown feature store settings {sorted(settings)}")
    lock = StoreLock(path, *storage.filesystem(path, storage_options)) if storage.is_remote(path) \
        else StoreLock(path)
    token, newly = lock.acquire_or_join()
    try:
        return _reopen(path, storage_options, want, token, newly)
    except BaseException:
        if newly:  # a run that cannot start leaves the store as it found it
            lock.release()
        raise


def _reopen(path: str | Path, storage_options: Mapping[str, Any] | None, want: dict[str, Any],
            token: str, newly: bool) -> FeatureStore:
    """:func:`open_or_create`'s reopening, under the writer lock."""
    have = dict(FeatureStore._open_group(path, False, storage_options).attrs)
    if have.get("format") == FORMAT and have.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: existing feature store has format_version {have.get('format_version')!r}, this "
            f"code writes {FORMAT_VERSION}; delete it or choose another output path"
        )
    store = FeatureStore.open(path, storage_options=storage_options, token=token, check=False)
    have = store.settings()
    diffs = [k for k in SETTINGS_KEYS if have.get(k) != want.get(k)]
    if diffs:
        lines = "; ".join(f"{k}: {_diff_text(have.get(k), want.get(k))}" for k in diffs)
        raise ConfigError(
            f"{path}: existing feature store was made with different settings ({lines}); "
            "delete it or choose another output path"
        )
    if newly:
        store._remove_leftovers()
    store.repaired = store.check()
    if store.repaired:
        store.unmark([d.shard for d in store.repaired])
    return store
