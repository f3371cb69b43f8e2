"""The images a ``ddps predict`` run reads: files, folders (searched recursively) and fsspec
URLs, each with the name its outputs get.

Rules (docs/predict.md):

* an image is a file whose suffix is one of :data:`IMAGE_SUFFIXES` (any case); every other
  file, named or found in a folder, is ignored and counted (so ``photos/*`` may name a
  ``notes.txt``);
* a folder (or a URL of a folder or prefix) is searched recursively; names starting with a dot
  are skipped, and so is the run's own output folder when it lies inside an input folder;
* a URL with ``*``, ``?`` or ``[`` is a glob (``s3://bucket/photos/*.jpg``);
* an image's *name* is its path relative to the folder given, without the suffix
  (``sub/a``), or, for a file given by itself, its stem (``a``); the outputs are
  ``masks/<name>.png`` and so on. Two images with the same name (``a.png`` and ``a.jpg``, or
  two inputs) are an error before anything runs.

A missing input, a folder with no image in it, or inputs with no image at all are an error
naming them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ddps_core import storage
from ddps_core.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageInput", "Inputs", "collect_inputs"]

#: The suffixes read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
_SUFFIXES = " ".join(IMAGE_SUFFIXES)
_GLOB = ("*", "?", "[")


@dataclass(frozen=True)
class ImageInput:
    """One image to predict."""

    source: str
    """The file's path (as given, joined with its folder) or URL: what is read, and what the
    table's ``image`` column holds."""
    name: str
    """Its outputs' name: a POSIX relative path without suffix (``sub/a``)."""


@dataclass
class Inputs:
    images: list[ImageInput]
    ignored: list[str]
    """Files that are not images (by suffix), in the order found."""


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def _local(arg: str, exclude: Path | None) -> tuple[list[ImageInput], list[str], bool]:
    path = storage.local_path(arg)
    if path.is_file():
        return ([ImageInput(str(path), path.stem)], [], False) if _is_image(path.name) else ([], [str(path)], False)
    if not path.is_dir():
        raise DataError(f"{arg}: no such file or folder")
    found: list[ImageInput] = []
    ignored: list[str] = []
    skip = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(path):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip is None or (here / d).resolve() != skip))
        for f in sorted(files):
            if f.startswith("."):
                continue
            full = here / f
            rel = full.relative_to(path)
            if _is_image(f):
                found.append(ImageInput(str(full), rel.with_suffix("").as_posix()))
            else:
                ignored.append(str(full))
    return found, ignored, True


def _remote(arg: str, options: Mapping[str, Any] | None) -> tuple[list[ImageInput], list[str], bool]:
    """The files of a URL: a file, a folder or prefix (recursively) or a glob; each named by
    the URL as given plus its path below it."""
    fs, path = storage.filesystem(arg, options)
    with storage.remote_errors(arg, "list it"):
        if any(c in path for c in _GLOB):
            base = path[: min(path.index(c) for c in _GLOB if c in path)].rsplit("/", 1)[0]
            base_url = arg[: min(arg.index(c) for c in _GLOB if c in arg)].rsplit("/", 1)[0]
            listed, folder = sorted(p for p in fs.glob(path) if not fs.isdir(p)), True
        elif fs.isdir(path):
            base, base_url = path.rstrip("/"), arg.rstrip("/")
            listed, folder = sorted(fs.find(path)), True
        elif fs.isfile(path):
            base, listed, folder = path.rsplit("/", 1)[0], [path], False
            base_url = arg.rsplit("/", 1)[0]
        else:
            raise DataError(f"{arg}: no such file, folder or prefix")
    found: list[ImageInput] = []
    ignored: list[str] = []
    for p in listed:
        rel = PurePosixPath(p[len(base):].lstrip("/") if p.startswith(base + "/") else PurePosixPath(p).name)
        if _hidden(rel.parts):
            continue
        url = f"{base_url}/{rel.as_posix()}"
        if _is_image(rel.name):
            found.append(ImageInput(url, rel.with_suffix("").as_posix() if folder else rel.stem))
        else:
            ignored.append(url)
    return found, ignored, folder


def collect_inputs(args: Sequence[str], options: Mapping[str, Any] | None = None,
                   exclude: str | os.PathLike[str] | None = None) -> Inputs:
    """The images of ``args`` (files, folders, URLs) by the rules of the module text;
    ``options``: fsspec storage options; ``exclude``: a local folder never searched (the run's
    output folder)."""
    if not args:
        raise DataError("no input given: name image files, folders or URLs")
    skip = None if exclude is None or storage.is_remote(exclude) else storage.local_path(exclude)
    images: list[ImageInput] = []
    ignored: list[str] = []
    for arg in args:
        arg = os.fspath(arg)
        found, skipped, folder = _remote(arg, options) if storage.is_remote(arg) else _local(arg, skip)
        if folder and not found:
            raise DataError(f"{arg}: no image file in it (the suffixes read are {_SUFFIXES})")
        images += found
        ignored += skipped
    if not images:
        raise DataError(f"{', '.join(map(os.fspath, args))}: not an image file (the suffixes read are {_SUFFIXES})")
    by_name: dict[str, str] = {}
    for image in images:
        if image.name in by_name:
            raise DataError(f"{by_name[image.name]} and {image.source}: both would be written as "
                            f"{image.name}.png; rename one, or predict them into separate --out folders")
        by_name[image.name] = image.source
    return Inputs(images, ignored)
