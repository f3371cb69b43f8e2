"""Output locations that are either local paths or fsspec URLs (``s3://bucket/key``).

Feature stores (``features.out``) and the evaluate stage's reports (``evaluate.reports``)
may live on an object store. A location is

* a plain path (``data/features``) or a ``file://`` URL (``file:///abs/data/features``):
  local, handled as a :class:`~pathlib.Path` with the usual temp-file + fsync + rename;
* any other URL (``s3://bucket/prefix``, ``memory://x``, ...): remote, handled through the
  fsspec filesystem of its protocol, with the storage options of ``storage.options`` in
  ``params.yaml`` (credentials and endpoints are better left to the environment: s3fs reads
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...).

Atomicity on a remote store comes from writing every object in ONE put (an S3 PUT, or a
multipart upload, is visible all at once or not at all); there is no rename and no fsync.

Errors: a protocol with no installed fsspec implementation is a :class:`ConfigError`, and
a remote operation that fails (no such bucket, no credentials, endpoint unreachable) a
:class:`DataError`; both are one line naming the URL.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ddps_core.errors import ConfigError, DataError, DDPSError
from ddps_core.io import atomic_write_bytes

__all__ = [
    "Location",
    "check_protocol",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "local_path",
    "read_bytes",
    "remote_errors",
    "remove_tree",
    "size_of",
    "write_bytes",
    "write_text",
]

Location = str | os.PathLike[str]
Options = Mapping[str, Any] | None


def _protocol(location: Location) -> str | None:
    text = os.fspath(location)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head and "/" not in head else None


def is_remote(location: Location) -> bool:
    """True for a URL whose protocol is not ``file`` (``s3://...``, ``memory://...``)."""
    proto = _protocol(location)
    return proto is not None and proto not in ("file", "local")


def local_path(location: Location) -> Path:
    """The local :class:`Path` of a plain path or a ``file://`` URL."""
    if is_remote(location):
        raise ValueError(f"{location}: not a local location")
    text = os.fspath(location)
    if _protocol(text) is not None:
        parsed = urlparse(text)
        return Path(unquote(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost")
                    else unquote(parsed.path))
    return Path(text)


def join(location: Location, *parts: str) -> Path | str:
    """``location / part / ...``: a Path for a local location, a URL string otherwise."""
    if not is_remote(location):
        return local_path(location).joinpath(*parts)
    out = os.fspath(location).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def check_protocol(location: Location) -> None:
    """Raise :class:`ConfigError` (naming ``location``) when it is a URL whose protocol has
    no installed fsspec implementation; plain paths and ``file://`` URLs always pass."""
    if not is_remote(location):
        return
    import fsspec

    url = os.fspath(location)
    proto = _protocol(url)
    try:
        fsspec.get_filesystem_class(proto)
    except ValueError:
        raise ConfigError(f"{url}: no fsspec implementation is known for protocol {proto!r}") from None
    except ImportError as exc:
        hint = " (pip install 'ddps[s3]')" if proto in ("s3", "s3a") else ""
        raise ConfigError(f"{url}: the fsspec implementation of protocol {proto!r} is not installed "
                          f"({_message(exc)}){hint}") from None


def filesystem(url: Location, options: Options = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of a remote URL.

    A protocol with no installed implementation (``gcs://`` without gcsfs, a typo) raises
    :class:`ConfigError` naming the URL and what to install.
    """
    from fsspec.core import url_to_fs

    url = os.fspath(url)
    proto = _protocol(url) or "file"
    check_protocol(url)
    try:
        return url_to_fs(url, **dict(options or {}))
    except DDPSError:
        raise
    except Exception as exc:  # bad storage options
        raise ConfigError(f"{url}: cannot set up the {proto!r} filesystem "
                          f"(storage.options?): {type(exc).__name__}: {exc}") from None


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def remote_errors(url: Location, what: str) -> Iterator[None]:
    """Turn a failing remote operation into one :class:`DataError` line naming ``url``
    (the project's own errors pass through)."""
    try:
        yield
    except DDPSError:
        raise
    except Exception as exc:
        raise DataError(f"{os.fspath(url)}: cannot {what}: {type(exc).__name__}: {_message(exc)}") from None


def exists(location: Location, options: Options = None) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    fs, path = filesystem(location, options)
    with remote_errors(location, "check whether it exists"):
        return bool(fs.exists(path))


def remove_tree(location: Location, options: Options = None) -> None:
    """Delete a folder (or prefix) and everything below it; nothing if it does not exist."""
    if not is_remote(location):
        import shutil

        shutil.rmtree(local_path(location), ignore_errors=False)
        return
    fs, path = filesystem(location, options)
    with remote_errors(location, "delete it"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def size_of(location: Location, options: Options = None) -> int:
    """Bytes of every file under a folder (or prefix)."""
    if not is_remote(location):
        total = 0
        for root, _, files in os.walk(local_path(location)):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, f)).st_size
        return total
    fs, path = filesystem(location, options)
    with remote_errors(location, "list it"):
        return int(fs.du(path, total=True))


def read_bytes(location: Location, options: Options = None) -> bytes:
    if not is_remote(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location, options)
    with remote_errors(location, "read it"):
        return fs.cat_file(path)


def write_bytes(location: Location, data: bytes, options: Options = None) -> None:
    """Write ``data`` atomically: temp file + fsync + rename locally, one put remotely."""
    if not is_remote(location):
        atomic_write_bytes(local_path(location), data)
        return
    fs, path = filesystem(location, options)
    with remote_errors(location, "write it"):
        fs.pipe_file(path, bytes(data))


def write_text(location: Location, text: str, options: Options = None) -> None:
    write_bytes(location, text.encode("utf-8"), options)
