"""The ``data`` stage: make the canonical dataset every later stage reads.

``data.source: synthetic`` generates the embedded face-parts domain. Any other source is
IMPORTED: every file of the configured splits is read through its reader (so every fault is
found here, once, with the file named), and written in the DDPM-Seg folder layout::

    <out>/real/train/<id>.png + <id>.npy      labelled training images
    <out>/real/test/<id>.png + <id>.npy       labelled test images
    <out>/unlabeled/<id>.png                  unlabelled pool (optional)
    <out>/classes.yaml                        classes, num_classes, ignore_index, provenance

Images keep their size (non-square ones are squared later, where they meet a model). The
build goes to a sibling ``.<name>.partial`` folder, file by file and atomically, so an
interrupted import resumes; the finished folder replaces ``out`` in one swap. An existing
``out`` that this stage did not make is never overwritten.

The import has an identity: its settings and the *content* of every file it reads
(:func:`content_identity`: the sha256 of each file, under its path relative to the root).
``classes.yaml`` records it. A rerun whose identity is the recorded one reuses ``out`` as it
is (nothing is read or written but the hashes); any other rebuilds it, so new content under
the same file names is never missed, even when a copy kept the old modification times. A
leftover build folder of another identity is discarded. Hashing is kept cheap by a manifest
beside ``out`` (``.<name>.sources.json``, not part of the output): a file whose size,
modification time, change time and inode are those recorded keeps its recorded hash; the
change time is the file system's own and no copy can set it, so it is the hash that decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ddps_core.config import DataSettings, Settings
from ddps_core.datasets.added import AddedLabels, added_labels, count_files
from ddps_core.datasets.common import npy_bytes, png_bytes
from ddps_core.datasets.readers import open_dataset, split_folders
from ddps_core.datasets.reference import reference_dataset
from ddps_core.datasets.synthetic import make_synthetic
from ddps_core.errors import DataError, DataWarning
from ddps_core.io import atomic_write_bytes, atomic_write_text, partial_folder, swap_folder
from ddps_core.progress import Reporter
from ddps_core.stages import Stage

_MARK = "prepared"


def prepare_dataset(data: DataSettings, progress: Callable[[int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Make or import the dataset ``data`` describes; a summary with ``counts`` per split.
    ``warn`` hears of split folders that are present but not imported."""
    added = added_labels(data.added)
    if data.source == "synthetic":
        return make_synthetic(data.out, progress=progress, added=added, **data.synthetic.model_dump())
    return import_dataset(data, progress, warn, added)


def data(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``data``: the canonical dataset in ``data.out``."""
    d = settings.data
    total = sum(d.synthetic.model_dump()[k] for k in ("n_unlabeled", "n_labeled", "n_test")) \
        if d.source == "synthetic" else None
    report.progress("data", 0, total)
    summary = prepare_dataset(d, progress=lambda n: report.progress("data", n, total), warn=report.log)
    report.log(f"dataset in {d.out}: " + ", ".join(f"{n} {split}" for split, n in summary["counts"].items())
               + (" (reused)" if summary.get("reused") else ""))
    return summary


DATA = Stage("data", main=data, device="cpu", products=lambda s: [s.data.out])


def reader_split_of(data: DataSettings, split: str) -> str | None:
    return data.split_map().get(split)


def _settings(data: DataSettings) -> dict[str, Any]:
    return {"dataset": data.dataset, "source": data.source, "root": str(Path(data.root or "").resolve()),
            "num_classes": data.num_classes, "ignore_index": data.ignore_index,
            "splits": data.split_map()}


def _made_here(out: Path) -> bool:
    try:
        doc = yaml.safe_load((out / "classes.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and (_MARK in doc or "synthetic" in doc)


def import_splits(data: DataSettings, warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """Canonical split -> the reader's split to import. Every split folder found is imported:
    a default split whose folder is absent is skipped (``train`` must exist); a split set in
    ``data.splits`` must exist; a folder present but imported as no split is named to
    ``warn``."""
    present = split_folders(data.source, data.root)
    explicit = data.splits or {}
    chosen = {}
    for split, reader_split in data.split_map().items():
        if reader_split is None:
            continue
        if reader_split not in present and split != "train" and split not in explicit:
            continue  # an optional split this dataset does not have
        chosen[split] = reader_split
    for name, folder in present.items():
        if name not in chosen.values() and warn is not None:
            warn(f"{folder}: split folder not imported (data.splits maps no train / test / unlabeled "
                 f"split to {name!r})")
    return chosen


def samples_reporting(reader: Any, warn: Callable[[str], None] | None) -> Iterator[Any]:
    """``reader``'s samples, each :class:`~ddps_core.errors.DataWarning` raised while reading
    one (a label resized to its image) passed to ``warn`` (or left to Python's warnings)."""
    for i in range(len(reader)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            sample = reader[i]
        for w in caught:
            if warn is not None and issubclass(w.category, DataWarning):
                warn(f"warning: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        yield sample


def _manifest_path(out: Path) -> Path:
    return out.parent / f".{out.name}.sources.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def content_identity(files: Iterable[Path], root: Path, manifest: Path | None = None) -> str:
    """The sha256 (16 hex digits) of ``files``' paths relative to ``root``, sizes and content
    hashes. ``manifest`` caches each file's hash under its stat (size, mtime, ctime, inode):
    an unchanged file is not read again. A manifest that cannot be written is only a cache
    lost."""
    cache: dict[str, Any] = {}
    if manifest is not None:
        try:
            cache = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError):
            cache = {}
    fresh: dict[str, Any] = {}
    h = hashlib.sha256()
    for path in sorted(set(files)):
        try:
            st = path.stat()
            key = _stat_key(st)
            known = cache.get(str(path))
            if isinstance(known, list) and known[:4] == key:
                digest = known[4]
            else:
                with open(path, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
        fresh[str(path)] = [*key, digest]
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\0{st.st_size}\0{digest}\n".encode())
    if manifest is not None and fresh != cache:
        try:
            atomic_write_text(manifest, json.dumps({"files": fresh}, sort_keys=True))
        except OSError:
            pass
    return h.hexdigest()[:16]


def _reusable(out: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded summary when ``out`` is a complete import of exactly ``ident``."""
    try:
        doc = yaml.safe_load((out / "classes.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict) or doc.get(_MARK) != ident or not isinstance(doc.get("summary"), dict):
        return None
    summary = doc["summary"]
    for split, n in summary.get("counts", {}).items():
        folder = out / ("unlabeled" if split == "unlabeled" else f"real/{split}")
        try:
            pngs = sum(1 for name in os.listdir(folder) if name.endswith(".png") and not name.startswith("."))
        except OSError:
            return None
        if pngs != n:
            return None
    return dict(summary)


def import_dataset(data: DataSettings, progress: Callable[[int], None] | None = None,
                   warn: Callable[[str], None] | None = None, added: AddedLabels | None = None) -> dict[str, Any]:
    """Validate a user dataset and write it to ``data.out`` in the canonical layout, with the
    ``added`` labels joined to its training split; reuse ``data.out`` when it holds the import
    of the same settings and file contents."""
    out = Path(data.out)
    if out.exists() and any(out.iterdir()) and not _made_here(out):
        raise DataError(f"{out}: folder exists, is not empty and was not made by the data "
                        "stage; refusing to overwrite it (choose another data.out)")
    readers = {}
    for split, reader_split in import_splits(data, warn).items():
        readers[split] = open_dataset(data.source, data.root, reader_split,
                                      num_classes=data.num_classes, ignore_index=data.ignore_index)
    if "train" not in readers:
        raise DataError(f"{data.root}: data.splits maps no reader split to 'train'")
    sources = [p for reader in readers.values() for p in reader.source_files()]
    settings = {**_settings(data), "content": content_identity(sources, Path(data.root), _manifest_path(out))}
    if added is not None:
        settings["added"] = added.record()
    done = _reusable(out, settings)
    if done is not None:
        return {**done, "out_dir": str(out), "reused": True}
    first = readers["train"]
    names = first.class_names or [f"class_{i}" for i in range(first.num_classes)]
    extra: dict[str, Any] = {}
    if data.dataset is not None:
        ref = reference_dataset(data.dataset)
        names = list(ref.classes)
        extra = {"dataset": ref.name, "palette": [list(c) for c in ref.palette]}
        for split, n in (("train", ref.train_images), ("test", ref.test_images)):
            if split in readers and len(readers[split]) != n and warn is not None:
                warn(f"{data.root}: {len(readers[split])} {split} images; the DDPM-Seg reference uses the first {n} "
                     f"of {ref.name}" + (" (teacher.n_train picks the first N)" if split == "train" else ""))
    partial = partial_folder(out, json.dumps(settings, sort_keys=True))
    counts: dict[str, int] = {}
    pixels = np.zeros(first.num_classes, dtype=np.int64)
    n_done = 0
    for split, reader in readers.items():
        before = int(pixels.sum())
        folder = partial / ("unlabeled" if split == "unlabeled" else f"real/{split}")
        folder.mkdir(parents=True, exist_ok=True)
        for sample in samples_reporting(reader, warn):  # reading validates: a fault raises DataError naming the file
            png, npy = folder / f"{sample.id}.png", folder / f"{sample.id}.npy"
            labelled = split != "unlabeled" and sample.label is not None
            if split != "unlabeled" and sample.label is None:
                raise DataError(f"{data.root}: image {sample.id!r} of split {split!r} "
                                f"({reader_split_of(data, split)!r}) has no label")
            if labelled:
                valid = sample.label[sample.label != data.ignore_index]
                pixels += np.bincount(valid.ravel(), minlength=len(pixels))[: len(pixels)]
                if not npy.is_file():
                    atomic_write_bytes(npy, npy_bytes(sample.label))
            if not png.is_file():
                atomic_write_bytes(png, png_bytes(sample.image))
            n_done += 1
            if progress is not None:
                progress(n_done)
        if split == "train" and int(pixels.sum()) == before:
            raise DataError(f"{getattr(reader, 'folder', data.root)}: every label pixel of the training split is "
                            f"the ignore index {data.ignore_index}: there is nothing to train on")
        counts[split] = len(reader)
    if added is not None:
        def count(label: np.ndarray) -> None:
            valid = label[label != data.ignore_index]
            pixels[:] += np.bincount(valid.ravel(), minlength=len(pixels))[: len(pixels)]

        added.apply(partial, count)
        counts["train"] = count_files(partial / "real" / "train")
        if "unlabeled" in counts:
            counts["unlabeled"] = count_files(partial / "unlabeled")
    total = int(pixels.sum())
    summary = {
        "counts": counts,
        "num_classes": first.num_classes,
        "classes": names,
        "class_pixel_fractions": {n: round(float(c) / total, 6) if total else 0.0
                                  for n, c in zip(names, pixels, strict=True)},
    }
    doc = {"classes": names, "num_classes": first.num_classes,
           "ignore_index": data.ignore_index, **extra, _MARK: settings, "summary": summary}
    atomic_write_text(partial / "classes.yaml", yaml.safe_dump(doc, sort_keys=False))
    swap_folder(partial, out)
    return {**summary, "out_dir": str(out), "reused": False}
