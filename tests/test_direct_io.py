"""Shard files written past the page cache (O_DIRECT, ``ddps_core.features.shardio``): the
aligned image data really goes direct, everything else through the cache, the bytes are the
same either way, a file system that refuses O_DIRECT turns it off without an error, and a
failing write still names the file."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest

from ddps_core.features import FeatureStore, shard_ranges
from ddps_core.features import shardio
from ddps_core.features.shardio import DIRECT_ALIGN, DirectIO, aligned_empty, write_files_atomic

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")


@pytest.fixture
def pwrites(monkeypatch):
    """Every os.pwrite as (direct?, offset, nbytes)."""
    calls = []
    real = os.pwrite

    def spy(fd, data, offset):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        calls.append((direct, offset, len(memoryview(data).cast("B"))))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return calls


def _data(nbytes: int, offset: int = 0) -> tuple[np.ndarray, bytes]:
    buf = aligned_empty((nbytes + offset,), np.uint8)
    buf[:] = np.random.default_rng(nbytes).integers(0, 256, buf.size, dtype=np.uint8)
    view = buf[offset:]
    return view, view.tobytes()


def test_aligned_buffer_is_page_aligned_and_shaped():
    for shape in [(3, 5, 7), (1,), (16, 64, 8, 8)]:
        a = aligned_empty(shape, np.float16)
        assert a.shape == shape and a.dtype == np.float16 and a.flags.c_contiguous
        assert a.ctypes.data % DIRECT_ALIGN == 0


def test_aligned_data_goes_direct_the_rest_through_the_cache(tmp_path, pwrites):
    data, expect = _data(3 * DIRECT_ALIGN + 100)
    index = b"index-bytes"
    direct = DirectIO(True)
    write_files_atomic([(tmp_path / "f", [memoryview(data), index])], direct=direct)
    assert (tmp_path / "f").read_bytes() == expect + index
    assert pwrites[0] == (True, 0, 3 * DIRECT_ALIGN)  # whole pages, from the buffer
    assert all(not d for d, _, _ in pwrites[1:])  # tail and index: buffered
    assert sum(n for _, _, n in pwrites) == len(expect) + len(index)
    assert direct.enabled


def test_unaligned_buffer_and_disabled_direct_write_through_the_cache(tmp_path, pwrites):
    data, expect = _data(2 * DIRECT_ALIGN, offset=8)  # starts 8 bytes past a page
    write_files_atomic([(tmp_path / "a", [memoryview(data)])], direct=DirectIO(True))
    aligned, expect_b = _data(2 * DIRECT_ALIGN)
    write_files_atomic([(tmp_path / "b", [memoryview(aligned)])], direct=DirectIO(False))
    assert (tmp_path / "a").read_bytes() == expect and (tmp_path / "b").read_bytes() == expect_b
    assert pwrites and not any(d for d, _, _ in pwrites)


def test_file_system_refusing_direct_open_turns_it_off(tmp_path, monkeypatch, pwrites):
    real_open = os.open
    tries = []

    def open_(path, flags, *args):
        if flags & os.O_DIRECT:
            tries.append(path)
            real_open(path, os.O_WRONLY | os.O_CREAT, 0o666)  # as the kernel may: created, then refused
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    direct = DirectIO(True)
    data, expect = _data(2 * DIRECT_ALIGN)
    write_files_atomic([(tmp_path / "a", [memoryview(data)]), (tmp_path / "b", [memoryview(data)])], direct=direct)
    assert (tmp_path / "a").read_bytes() == expect == (tmp_path / "b").read_bytes()
    assert not direct.enabled and len(tries) == 1  # the second file did not try again
    assert not list(tmp_path.glob("*.partial"))


def test_direct_write_refused_falls_back_for_the_whole_piece(tmp_path, monkeypatch):
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "alignment")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    direct = DirectIO(True)
    data, expect = _data(4 * DIRECT_ALIGN + 7)
    write_files_atomic([(tmp_path / "f", [memoryview(data), b"idx"])], direct=direct)
    assert (tmp_path / "f").read_bytes() == expect + b"idx" and not direct.enabled


@pytest.mark.parametrize("where", ["pwrite", "fsync"])
def test_failing_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, where):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    real = getattr(os, where)

    def full(fd, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, full)
    data, _ = _data(DIRECT_ALIGN)
    with pytest.raises(OSError) as info:
        write_files_atomic([(target, [memoryview(data)])], direct=DirectIO(True))
    monkeypatch.setattr(os, where, real)
    assert info.value.errno == errno.ENOSPC and info.value.filename.startswith(str(target) + ".")
    assert target.read_bytes() == b"old" and not list(tmp_path.glob("*.partial"))


def test_only_stores_too_large_for_the_cache_go_direct_unless_told(monkeypatch):
    monkeypatch.delenv("DDPS_DIRECT_IO", raising=False)
    monkeypatch.setattr(shardio, "available_memory", lambda: 8 << 30)
    assert not DirectIO(nbytes=4 << 30).enabled  # half of the available memory: cached
    assert DirectIO(nbytes=(4 << 30) + 1).enabled
    assert not DirectIO().enabled  # size unknown
    monkeypatch.setenv("DDPS_DIRECT_IO", "1")
    assert DirectIO(nbytes=1).enabled and shardio.direct_io_default()
    monkeypatch.setenv("DDPS_DIRECT_IO", "0")
    assert not DirectIO(nbytes=1 << 50).enabled
    assert DirectIO(True).enabled and not DirectIO(False).enabled  # explicit beats the rule


def test_available_memory_reads_meminfo():
    avail = shardio.available_memory()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert avail is not None and 0 < avail <= total  # Linux has MemAvailable since 3.14


def test_read_only_opens_do_not_decide_the_write_mode(tmp_path, monkeypatch):
    store = FeatureStore.create(tmp_path / "s", model_id="m", steps=[5], blocks=[0], image_size=8,
                                image_ids=["a", "b"], shapes={"t5_b0": (32, 8, 8)}, shard_images=2)
    monkeypatch.setattr(shardio, "available_memory", lambda: pytest.fail("asked without writing"))
    reopened = FeatureStore.open(store.path, read_only=True)
    assert reopened.n_done() == 0


def test_store_follows_the_size_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPS_DIRECT_IO", raising=False)
    shapes = {"t5_b0": (32, 8, 8)}  # 4 KiB per image
    for avail, expect in ((1 << 40, False), (2 * 4096 * 10 - 2, True)):
        monkeypatch.setattr(shardio, "available_memory", lambda avail=avail: avail)
        store = FeatureStore.create(tmp_path / f"s{avail}", model_id="m", steps=[5], blocks=[0], image_size=8,
                                    image_ids=[str(i) for i in range(10)], shapes=shapes, shard_images=2)
        assert store.direct_io is expect


def test_store_files_are_the_same_bytes_direct_or_not(tmp_path, monkeypatch, pwrites):
    shapes = {"t5_b0": (32, 8, 8), "t5_b1": (3, 5, 5)}  # 4 KiB images (direct) and 150-byte ones
    S, n = 8, 5
    files = {}
    for env in ("1", "0"):
        monkeypatch.setenv("DDPS_DIRECT_IO", env)
        store = FeatureStore.create(
            tmp_path / f"s{env}", model_id="m", steps=[5], blocks=[0, 1], image_size=S,
            image_ids=[str(i) for i in range(n)], shapes=shapes, shard_images=2, num_classes=3, ignore_index=255)
        rng = np.random.default_rng(1)
        for k, a, b in shard_ranges(store):
            feats = {}
            for name, shp in shapes.items():
                feats[name] = aligned_empty((b - a, *shp), np.float16)
                feats[name][:] = rng.standard_normal((b - a, *shp))
            store.write_shard(k, feats, rng.integers(0, 3, (b - a, S, S)).astype(np.uint8))
        files[env] = {p.relative_to(store.path): p.read_bytes() for p in sorted(store.path.rglob("*")) if p.is_file()}
        if env == "1":
            assert any(d for d, _, _ in pwrites)
    assert files["1"] == files["0"]
