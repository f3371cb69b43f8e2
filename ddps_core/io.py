"""Atomic file output: write to a temporary name in the target folder, then rename.

A reader never sees a partially written file under its final name, and a failed write leaves
whatever was there before untouched. The file ends with the mode a plain ``open`` would give
it under the process's umask (``0o666 & ~umask``), not the ``0o600`` of a private temporary.
"""

from __future__ import annotations

import contextlib
import shutil
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it
    (``/proc/self/status``); elsewhere set and restored at once, under a lock."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new plain file gets under the current umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The temporary file lives in the same folder (same filesystem), so the final
    ``os.replace`` is atomic. On any exception the temporary file is removed and ``path`` is
    left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:  # a read-only or full folder: name the file, not the temporary
        raise _naming(exc, final) from exc
    with contextlib.suppress(OSError):  # a file system without modes keeps its own
        os.fchmod(fd, file_mode())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, tmp_name, tmp):
            # a failed write (a full disk) names no file, or the temporary one
            raise _naming(exc, final) from exc
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """The same fault (same errno, so the same ``OSError`` subclass) naming ``path``."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def canonical_safetensors(blob: bytes) -> bytes:
    """``blob`` (a serialized safetensors file) with its JSON header written with sorted keys.

    The safetensors writer emits the ``__metadata__`` entries in hash-map order, which
    changes from process to process, so the same tensors and metadata gave different bytes
    (and DVC saw a changed output after every rerun). The tensor data and their offsets are
    untouched: offsets count from the end of the header, whose length may change; it stays
    padded with spaces to a multiple of 8 bytes, as the format wants."""
    import json
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def partial_folder(out: str | os.PathLike[str], settings_text: str, resume: bool = True) -> Path:
    """The sibling build folder ``.<name>.partial`` of ``out``, for a resumable folder build.

    Files are written into it atomically, one by one. A ``.settings.json`` marker records
    ``settings_text``: an interrupted build with the same settings resumes in the same folder
    (keeping what was written); a leftover build with other settings, or any leftover when
    ``resume`` is False, is discarded. Finish with :func:`swap_folder`.
    """
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    marker = partial / ".settings.json"
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    if partial.exists():
        try:
            same = marker.read_text(encoding="utf-8") == settings_text
        except OSError:
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, settings_text)
    return partial


def swap_folder(partial: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Put the finished build ``partial`` in place of ``out`` (two renames; the old one goes)."""
    partial, out = Path(partial), Path(out)
    (partial / ".settings.json").unlink(missing_ok=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)


def remove_stale(folder: str | os.PathLike[str], keep: Iterable[str]) -> list[Path]:
    """Delete the plain files directly in ``folder`` whose names are not in ``keep`` (hidden
    ones too; folders are left alone): what a rerun into the same folder no longer makes.
    Returns what was deleted."""
    folder, keep = Path(folder), set(keep)
    gone = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.name not in keep and (p.is_file() or p.is_symlink()) and not p.is_dir():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone
