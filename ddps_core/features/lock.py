"""The writer lock of a feature store: one extraction run writes a store at a time.

An extraction run is one planning step and the shard writers it starts. The planning step
creates or reopens the store for writing (:func:`~.store.open_or_create`,
:meth:`~.store.FeatureStore.create`) and takes the store's lock: the file
``<store>/writer.lock``, which names its holder (host, pid, command line, when it was
taken) and a random token. The lock belongs to the holder's process, until
:meth:`StoreLock.release` or until the process ends. Shard writers of the run write under it:

* every handle of the holder's process (its writer threads included);
* a process the holder started, directly or not (the workers of a local Dask cluster or a
  process pool that the planning process created): it descends from the holder;
* any other process that opens the store with the run's token
  (``FeatureStore.open(path, token=...)``, e.g. a worker of a Dask cluster on other hosts).

Each shard write first checks that the lock is still held by its run (that token, or that
ancestor), so a worker left over from a run that ended stops instead of writing beside a
new one. Any other writer (a second run, another process with no token) is refused with a
:class:`DataError` that names the holder. A lock whose holder died on this host is taken
over. One held by a process on another host cannot be checked from here; the message says
which file to delete if that process is gone.

Local stores use ``flock`` on the lock file, which the kernel releases when the holder dies
(even by SIGKILL), so taking over a dead holder's lock is atomic; a free lock is an empty
file. On an object store (no locks, no atomic create) the lock is an object written, then
read back to confirm; two runs starting within the same instant could both believe they
hold it. Its holder is alive if it is this process, or a live pid on this host.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddps_core import storage
from ddps_core.errors import DataError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock is advisory file content only
    fcntl = None

__all__ = ["LOCK_NAME", "Holder", "StoreLock"]

LOCK_NAME = "writer.lock"
HOST = socket.gethostname()


@dataclass(frozen=True)
class Holder:
    """Who holds a store's lock (the content of its lock file)."""

    host: str
    pid: int
    command: str
    token: str
    since: str

    @classmethod
    def me(cls) -> Holder:
        command = " ".join([os.path.basename(sys.executable), *sys.argv])
        return cls(HOST, os.getpid(), command[:200], uuid.uuid4().hex,
                   dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder recorded in ``data`` (None for an empty file: the lock is free)."""
        if not data.strip():
            return None
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), str(d["command"]), str(d["token"]), str(d["since"]))
        except (ValueError, KeyError, TypeError):
            return cls("?", -1, "unreadable lock file", "", "?")

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def is_this_process(self) -> bool:
        return self.host == HOST and self.pid == os.getpid()

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"


def _ancestors() -> set[int]:
    """Pids of this process's parent, its parent's parent, ... (Linux; elsewhere the parent).

    Never pid 1: every process descends from it, and in a container the run itself may be
    pid 1 (its workers then need the token)."""
    out, pid = set(), os.getpid()
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):
            if not out:  # no /proc: the parent only
                out.add(os.getppid())
            break
        if pid <= 1:
            break
        out.add(pid)
    out.discard(1)
    return out


class _Busy(DataError):
    """The lock is held by another live process (``holder``)."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Held:
    holder: Holder
    fd: int | None = None  # local: the flock'ed descriptor, open as long as the lock is held
    ino: int | None = None  # local: the lock file's inode (a store deleted and made anew is not ours)


# The locks this process holds, by store location. A process-wide table, because the lock
# is the process's: every handle of the store in this process writes under it.
_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


class StoreLock:
    """The lock of the store at ``location`` (a folder, or an fsspec URL with ``fs`` and
    ``root``, the filesystem and the store's path inside it)."""

    def __init__(self, location: str | os.PathLike[str], fs: Any = None, root: str | None = None):
        self.remote = fs is not None
        self.location = os.fspath(location)
        if self.remote:
            self._fs, self._key = fs, f"{root}/{LOCK_NAME}"
            self.key = self.location.rstrip("/")
        else:
            self.file = Path(location) / LOCK_NAME
            self.key = os.path.abspath(self.location)

    # -- reading ----------------------------------------------------------------------------

    def holder(self) -> Holder | None:
        """The recorded holder (None: free). A local holder that died still shows here
        until the lock is taken over."""
        if self.remote:
            with storage.remote_errors(self.location, "read its writer lock"):
                try:
                    return Holder.parse(self._fs.cat_file(self._key))
                except FileNotFoundError:
                    return None
        try:
            return Holder.parse(self.file.read_bytes())
        except FileNotFoundError:
            return None

    def _busy(self, holder: Holder | None, extra: str = "") -> _Busy:
        who = str(holder) if holder is not None else "a process that has not written its name yet"
        return _Busy(f"{self.location}: another extraction holds the store's writer lock: {who}; "
                     f"wait for it to finish or stop it{extra}", holder)

    def _still_ours(self, held: _Held) -> bool:
        if self.remote:
            current = self.holder()
            return current is not None and current.token == held.holder.token
        try:
            return os.stat(self.file).st_ino == held.ino
        except FileNotFoundError:
            return False

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> tuple[str, bool]:
        """Take the lock for this process: ``(token, newly)``, ``newly`` False when this
        process held it already. Raises :class:`DataError` naming the holder when another
        live process holds it."""
        with _GUARD:
            held = _HELD.get(self.key)
            if held is not None:
                if self._still_ours(held):
                    return held.holder.token, False
                self._forget(held)  # the store was deleted (and maybe made anew) meanwhile
            me = Holder.me()
            _HELD[self.key] = self._take_remote(me) if self.remote else self._take_local(me)
            return me.token, True

    def acquire_or_join(self) -> tuple[str, bool]:
        """:meth:`acquire`, or the holder's token when the holder is a process this one
        descends from (a worker that the run's process started): ``(token, newly)``."""
        try:
            return self.acquire()
        except _Busy as busy:
            holder = busy.holder
            if holder is None or holder.host != HOST or holder.pid not in _ancestors():
                raise
            return holder.token, False

    def _take_local(self, me: Holder) -> _Held:
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise DataError(f"{self.location}: feature store does not exist") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise self._busy(Holder.parse(os.pread(fd, 4096, 0))) from None
            old = Holder.parse(os.pread(fd, 4096, 0))
            if old is not None and old.host != HOST:
                # a holder on another host sharing this file system: its flock may not reach
                # us, and whether it still runs cannot be checked from here
                raise self._busy(old, f"; if it is no longer running, delete {self.file}")
            data = me.to_bytes()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            return _Held(me, fd, os.fstat(fd).st_ino)
        except BaseException:
            os.close(fd)  # also drops the flock
            raise

    def _take_remote(self, me: Holder) -> _Held:
        old = self.holder()
        if old is not None and not old.is_this_process():
            if old.host != HOST:
                raise self._busy(old, f"; if it is no longer running, delete {self.location}/{LOCK_NAME}")
            if _pid_alive(old.pid):
                raise self._busy(old)
        with storage.remote_errors(self.location, "write its writer lock"):
            self._fs.pipe_file(self._key, me.to_bytes())
        now = self.holder()
        if now is None or now.token != me.token:  # another run wrote it at the same moment
            raise self._busy(now)
        return _Held(me)

    def release(self) -> bool:
        """Give the lock back if this process holds it (returns whether it did)."""
        with _GUARD:
            held = _HELD.get(self.key)
            if held is None:
                return False
            if self._still_ours(held):
                if self.remote:
                    with storage.remote_errors(self.location, "remove its writer lock"), \
                            contextlib.suppress(FileNotFoundError):
                        self._fs.rm_file(self._key)
                else:
                    os.ftruncate(held.fd, 0)  # a free lock is an empty file (never unlinked:
                    # a process that opened it meanwhile would lock a file nobody else sees)
            self._forget(held)
            return True

    def _forget(self, held: _Held) -> None:
        _HELD.pop(self.key, None)
        if held.fd is not None:
            os.close(held.fd)

    # -- writing under the lock ----------------------------------------------------------------

    def authorize(self, token: str | None) -> str:
        """Check that a writer may write now, and return the token it writes under.

        With ``token`` (a shard writer of a run, possibly in another process): the lock must
        still hold that token. Without: this process, or a process it descends from, must
        hold the lock; it is taken if free (a writer on its own is a run of its own), and
        any other writer is refused."""
        if token is None:
            return self.acquire_or_join()[0]
        with _GUARD:
            held = _HELD.get(self.key)
            if held is not None and held.holder.token == token and self._still_ours(held):
                return token
        current = self.holder()
        if current is None or current.token != token:
            state = "is free" if current is None else f"is held by {current}"
            raise DataError(f"{self.location}: the extraction run this writer belongs to no longer holds "
                            f"the store's writer lock (it {state}); the writer stops")
        return token
