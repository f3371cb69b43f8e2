"""Outputs that cannot be written: a read-only output folder and a full disk. The command
stops with one message naming the path and the fault, and the earlier output is untouched.

How the fault is made depends on the machine, and each test says which way it used (in its
``method`` user property and in its assertion messages):

* **read-only**: ``chmod 0o555`` when the tests do not run as root. Root ignores permission
  bits, so as root the output folder is a tmpfs mounted and then remounted read-only
  (``mount -o remount,ro``; needs CAP_SYS_ADMIN). Where neither works (root without mount
  rights), the fault is simulated: creating a file in that folder raises ``EROFS``.
* **full disk**: a 1 MiB tmpfs (root with mount rights) filled up with a filler file, so the
  next write really fails with ``ENOSPC``. Otherwise simulated: ``fsync`` of a file in the
  output folder raises ``ENOSPC`` (what a full disk gives on write or fsync).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.bad_inputs.conftest import assert_clear_error, make_user_dataset, import_params, snapshot


def _mount_tmpfs(where: Path, size: str = "1m") -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Fault:
    """Makes ``folder`` read-only or full after the earlier output was written there."""

    def __init__(self, kind: str, folder: Path, monkeypatch: pytest.MonkeyPatch):
        self.kind, self.folder, self.monkeypatch = kind, folder, monkeypatch
        self.mounted = _mount_tmpfs(folder)
        if not self.mounted:
            folder.mkdir(parents=True, exist_ok=True)
        if kind == "read_only":
            self.method = ("chmod 0o555" if os.geteuid() != 0 else
                           "tmpfs remounted read-only" if self.mounted else
                           "simulated: root without mount rights, file creation raises EROFS")
        else:
            self.method = ("tmpfs of 1 MiB filled up" if self.mounted else
                           "simulated: no tmpfs mount possible, fsync raises ENOSPC")

    def arm(self) -> None:
        inside = str(self.folder)
        if self.kind == "read_only":
            if os.geteuid() != 0:
                for dirpath, dirnames, _ in os.walk(self.folder):
                    for d in [dirpath, *(os.path.join(dirpath, n) for n in dirnames)]:
                        os.chmod(d, 0o555)
            elif self.mounted:
                subprocess.run(["mount", "-o", "remount,ro", inside], check=True)
            else:
                real = tempfile.mkstemp

                def mkstemp(*args, dir=None, **kwargs):
                    if dir is not None and str(dir).startswith(inside):
                        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
                    return real(*args, dir=dir, **kwargs)

                self.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
                for name in ("mkdir", "makedirs"):
                    real_mk = getattr(os, name)

                    def mk(path, *a, _real=real_mk, **k):
                        if str(path).startswith(inside) and not os.path.isdir(path):
                            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                        return _real(path, *a, **k)

                    self.monkeypatch.setattr(os, name, mk)
        elif self.mounted:
            with open(self.folder / "filler", "wb", buffering=0) as fh:
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"\0" * 4096)
            assert os.statvfs(self.folder).f_bavail == 0, "the tmpfs is not full"
        else:
            real_fsync = os.fsync

            def fsync(fd):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(inside):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_fsync(fd)

            self.monkeypatch.setattr(os, "fsync", fsync)

    def close(self) -> None:
        if self.kind == "read_only" and os.geteuid() != 0:
            for dirpath, dirnames, _ in os.walk(self.folder):
                for d in [dirpath, *(os.path.join(dirpath, n) for n in dirnames)]:
                    os.chmod(d, 0o755)
        if self.mounted:
            _umount(self.folder)


@pytest.fixture(params=["read_only", "full_disk"])
def fault(request, tmp_path, monkeypatch):
    f = Fault(request.param, tmp_path / "mnt", monkeypatch)
    request.node.user_properties.append(("method", f.method))
    yield f
    monkeypatch.undo()
    f.close()


EXPECTED = {"read_only": ("read-only file system: cannot write here", "permission denied"),
            "full_disk": ("no space left on device (the disk is full)",)}


def _check(res, fault: Fault, *needles) -> None:
    msg = assert_clear_error(res, *needles)
    assert any(e in msg for e in EXPECTED[fault.kind]), f"[{fault.method}] {msg}"


def test_evaluate_report_cannot_be_written(fault, tmp_path, cli):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        label = rng.integers(0, 3, (16, 16), dtype=np.uint8)
        np.save(gt / f"im{i}.npy", label)
        np.save(pred / f"im{i}.npy", label if i else (label + 1) % 3)
    report = fault.folder / "report.parquet"
    args = ["score", "--pred", pred, "--gt", gt, "--num-classes", "3", "--out", report]
    assert cli(*args).code == 0  # the earlier output
    before = snapshot(fault.folder)
    np.save(pred / "im0.npy", np.load(gt / "im0.npy"))  # new predictions: another report
    fault.arm()
    res = cli(*args)
    _check(res, fault, report)
    if fault.kind == "full_disk" and fault.mounted:
        before.pop("filler", None)
        after = {k: v for k, v in snapshot(fault.folder).items() if k != "filler"}
    else:
        after = snapshot(fault.folder)
    assert after == before, fault.method


def test_data_import_cannot_be_written(fault, tmp_path, cli):
    root = make_user_dataset(tmp_path / "user")
    out = fault.folder / "dataset"
    params = import_params(tmp_path, root, out)
    assert cli("data", "prepare", "--params", params).code == 0  # the earlier import
    before = snapshot(out)
    import shutil

    shutil.rmtree(fault.folder / ".dataset.partial", ignore_errors=True)
    (root / "real" / "train" / "train_0.npy").unlink()  # the user relabels an image
    np.save(root / "real" / "train" / "train_0.npy", np.zeros((8, 8), np.uint8))
    fault.arm()
    res = cli("data", "prepare", "--params", params)
    _check(res, fault, fault.folder)
    assert snapshot(out) == before, fault.method


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_the_umask_gives_a_new_file(tmp_path, cli, umask):
    """Atomic writes go through a private temporary (mode 0600); the file they leave must have
    the mode a plain ``open`` gives under the umask, or other users and groups lose access."""
    root = make_user_dataset(tmp_path / "user")
    out = tmp_path / "dataset"
    params = import_params(tmp_path, root, out)
    old = os.umask(umask)
    try:
        assert cli("data", "prepare", "--params", params).code == 0
        report = tmp_path / "reports" / "report.parquet"
        pred = tmp_path / "pred"
        pred.mkdir()
        for label in (out / "real" / "test").glob("*.npy"):
            (pred / label.name).write_bytes(label.read_bytes())
        assert cli("score", "--pred", pred, "--gt", root / "real" / "test", "--num-classes", "3",
                   "--out", report).code == 0
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what the umask gives a new file
    finally:
        os.umask(old)
    want = plain.stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    written = [report, out / "classes.yaml", *sorted((out / "real" / "train").iterdir())]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(want) for p in written}
