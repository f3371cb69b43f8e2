"""Stores that know their own health: per-shard completion records (CRC32C and file sizes,
checked against hand computations from the Zarr v3 sharding spec), check() and verify()
naming damaged shards, the next extraction redoing exactly those, reads of a damaged store
failing with one line naming store and shard, and the writer lock (a second writer refused
with its holder named, stale locks taken over, shard writers of a run joining by token or
by descending from the run's process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import zarr

from ddps_core import storage
from ddps_core.diffusion import GaussianDiffusion, get_preset
from ddps_core.errors import ConfigError, DataError
from ddps_core.features import FeatureExtractor, FeatureStore, PixelSampler, extract_to_store, open_or_create
from ddps_core.features.lock import HOST, Holder

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"t3_b0": (2, 4, 4), "t3_b1": (1, 8, 8)}  # V = 32 + 64 = 96 values per image
V = 96
SETTINGS = dict(model_id="m", steps=[3], blocks=[0, 1], image_size=8, shapes=SHAPES,
                image_ids=[f"i{k}" for k in range(7)], shard_images=3, num_classes=4, ignore_index=255)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = {n: rng.standard_normal((7, *s)).astype(np.float16) for n, s in SHAPES.items()}
    labels = rng.integers(0, 4, (7, 8, 8)).astype(np.uint8)
    return feats, labels


def _filled(path: Path) -> tuple[FeatureStore, dict, np.ndarray]:
    store = FeatureStore.create(path, **SETTINGS)
    feats, labels = _data()
    for k in range(store.num_shards):
        a, b = store.shard_range(k)
        store.write_shard(k, {n: f[a:b] for n, f in feats.items()}, labels[a:b])
    return store, feats, labels


def _crc(a: np.ndarray) -> int:
    return google_crc32c.value(np.ascontiguousarray(a).tobytes())


def test_records_hold_the_crc32c_and_size_of_each_shard(tmp_path):
    store, feats, labels = _filled(tmp_path / "s")
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    records = group["done"][:]
    assert group["features"].attrs["offsets"] == {"t3_b0": [0, 32], "t3_b1": [32, 96]}  # for other readers
    assert records.shape == (3, 5) and records.dtype == np.uint64
    for k, (a, b) in enumerate([(0, 3), (3, 6), (6, 7)]):
        n = b - a
        # image i's row: its maps flattened one after the other, in the order of the names
        rows = np.concatenate([feats["t3_b0"][a:b].reshape(n, -1), feats["t3_b1"][a:b].reshape(n, -1)], axis=1)
        # a shard file: n inner chunks of one image, then an index of (offset, nbytes) per
        # chunk slot of the shard (3 here, absent ones included) and its CRC32C
        f_size, l_size = n * V * 2 + 16 * 3 + 4, n * 64 + 16 * 3 + 4
        assert (tmp_path / "s" / "features" / f"c.{k}.0").stat().st_size == f_size
        assert (tmp_path / "s" / "labels" / f"c.{k}.0.0").stat().st_size == l_size
        assert records[k].tolist() == [1, _crc(rows), f_size, _crc(labels[a:b]), l_size]
    assert store.check() == [] and store.verify() == []


def test_a_block_in_the_store_layout_is_written_as_it_is(tmp_path):
    store = FeatureStore.create(tmp_path / "s", **SETTINGS)
    feats, labels = _data()
    block = np.empty((3, V), np.float16)
    views = store.feature_views(block)
    for name in SHAPES:
        views[name][...] = feats[name][:3]
    assert store._as_block(0, views, 3) is block  # no copy
    copied = store._as_block(0, {n: f[:3] for n, f in feats.items()}, 3)  # other maps: gathered
    assert copied is not block and np.array_equal(copied, block)
    assert np.array_equal(store._as_block(0, block.astype(np.float32), 3), block)
    store.write_shard(0, views, labels[:3])
    assert np.array_equal(store.native(1)["t3_b1"], feats["t3_b1"][1].astype(np.float32))


def _damage(path: Path) -> None:
    """Shard 1's features file cut in half, shard 2's labels file deleted."""
    f = path / "features" / "c.1.0"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (path / "labels" / "c.2.0.0").unlink()


def test_check_and_verify_name_the_truncated_and_the_deleted_shard(tmp_path):
    store, _, _ = _filled(tmp_path / "s")
    _damage(tmp_path / "s")
    # a changed value, the file's size unchanged: only the checksums see it
    f = tmp_path / "s" / "features" / "c.0.0"
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0x40
    f.write_bytes(bytes(raw))
    found = store.check()
    assert [(d.shard, d.start, d.stop) for d in found] == [(1, 3, 6), (2, 6, 7)]
    assert str(found[0]) == "shard 1 (images 3-5): file features/c.1.0 has 314 bytes, 628 were written"
    assert str(found[1]) == "shard 2 (images 6-6): file labels/c.2.0.0 is missing"
    full = store.verify()
    assert [d.shard for d in full] == [0, 1, 2]
    assert "features/c.0.0 holds other values than were written (CRC32C differs)" in str(full[0])
    assert store.done_mask().all()  # reporting changes nothing
    assert [d.shard for d in store.verify(repair=True)] == [0, 1, 2]
    assert store.done_mask().tolist() == [False] * 7 and store.verify() == []


def test_reading_a_damaged_store_is_one_line_naming_store_and_shard(tmp_path):
    path = tmp_path / "s"
    store, _, _ = _filled(path)
    store.release()
    (path / "features" / "c.1.0").unlink()  # was: NaN features and a non-finite loss later
    with pytest.raises(DataError) as err:
        FeatureStore.open(path, read_only=True)  # every open for training, labelling, evaluation
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: feature store damaged: shard 1 (images 3-5)")
    assert "features/c.1.0 is missing" in msg
    writable = FeatureStore.open(path)  # the extraction's own open does not refuse ...
    with pytest.raises(DataError, match=r"shard 1 \(images 3-5\)"):
        PixelSampler(writable)  # ... but training from it does
    assert FeatureStore.open(path, read_only=True, check=False).check()[0].shard == 1  # for reports

    # a file damaged after the open: the read names the store, the shard and its file
    other, _, _ = _filled(tmp_path / "t")
    other.release()
    reader = FeatureStore.open(tmp_path / "t", read_only=True)
    f = tmp_path / "t" / "features" / "c.2.0"
    f.write_bytes(f.read_bytes()[:100])  # the shard index at the end is gone: zarr's checksum fails
    with pytest.raises(DataError) as err:
        reader.native(6)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 't'}: feature store damaged: shard 2 (images 6-6): "
                                              "file features/c.2.0 cannot be read")


def _extractor() -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(get_preset("tiny32").build().eval(), GaussianDiffusion.from_name("linear", 1000),
                            [10], [0, 2], model_id="tiny")


def _files(path: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in path.rglob("*") if p.is_file() and p.name != "writer.lock"}


def test_the_next_extraction_redoes_exactly_the_damaged_shards(tmp_path):
    ext = _extractor()
    rng = np.random.default_rng(1)
    source = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 3, (32, 32)).astype(np.uint8))
              for _ in range(8)]
    settings = dict(**ext.store_settings(), image_ids=[f"i{k}" for k in range(8)], shard_images=2,
                    num_classes=3, ignore_index=255)
    path = tmp_path / "s.zarr"
    with open_or_create(path, **settings) as store:
        assert extract_to_store(source, ext, store, batch_size=2)["shards_written"] == 4
    before = _files(path)
    _damage(path)
    time.sleep(0.01)  # a rewritten file gets a later mtime

    store = open_or_create(path, **settings)  # the next run
    assert [d.shard for d in store.repaired] == [1, 2]
    assert store.done_mask().tolist() == [True, True, False, False, False, False, True, True]
    counts = extract_to_store(source, ext, store, batch_size=2)
    assert counts == {"shards_written": 2, "shards_skipped": 2, "images_written": 4, "images_skipped": 4}
    after = _files(path)
    assert sorted(after) == sorted(before)
    redone = {"features/c.1.0", "labels/c.1.0.0", "done/c.1.0", "features/c.2.0", "labels/c.2.0.0", "done/c.2.0"}
    for key, (data, mtime) in after.items():
        assert data == before[key][0], key  # the same bytes again (extraction is deterministic)
        assert (mtime != before[key][1]) == (key in redone), key  # nothing else was touched
    assert FeatureStore.open(path, read_only=True).verify() == []


# --------------------------------------------------------------------------- the writer lock

HOLDER = """
import sys, time
from ddps_core.features import FeatureStore
store = FeatureStore.open(sys.argv[1])
store.authorize()  # a writer on its own takes the lock for its process
print(store.token, flush=True)
time.sleep(120)
"""


def _holder(path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "extract-run-marker"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    token = proc.stdout.readline().strip()
    assert token, proc.stderr.read()
    return proc, token


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    path = tmp_path / "s"
    store, feats, labels = _filled(path)
    store.release()
    proc, token = _holder(path)
    try:
        for attempt in (lambda: open_or_create(path, **SETTINGS),  # a second run's planning step
                        lambda: FeatureStore.open(path).write_shard(0, {n: f[:3] for n, f in feats.items()}, labels[:3]),
                        lambda: open_or_create(path, **{**SETTINGS, "model_id": "other"})):  # settings changed
            with pytest.raises(DataError) as err:
                attempt()
            msg = str(err.value)
            assert "\n" not in msg and msg.startswith(f"{path}: another extraction holds the store's writer lock: ")
            assert f"pid {proc.pid} on {HOST}" in msg and "extract-run-marker" in msg
        assert FeatureStore.open(path, read_only=True).verify() == []  # nothing was touched
        # a shard writer of the holder's run, in another process, writes with the run's token
        member = FeatureStore.open(path, token=token)
        member.write_shard(1, {n: f[3:6] for n, f in feats.items()}, labels[3:6])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = open_or_create(path, **SETTINGS)  # the holder died: its lock is taken over
    assert store.token != token and Holder.parse((path / "writer.lock").read_bytes()).pid == os.getpid()
    with pytest.raises(DataError, match="no longer holds the store's writer lock"):  # a left-over worker stops
        member.write_shard(1, {n: f[3:6] for n, f in feats.items()}, labels[3:6])
    assert store.release() and (path / "writer.lock").read_bytes() == b""  # a free lock is empty
    assert FeatureStore.open(path, read_only=True).lock_holder() is None


CHILD_WRITER = """
import sys, numpy as np
from ddps_core.features import FeatureStore
store = FeatureStore.open(sys.argv[1])
store.write_shard(2, {"t3_b0": np.ones((1, 2, 4, 4)), "t3_b1": np.ones((1, 1, 8, 8))},
                  np.zeros((1, 8, 8), np.uint8))
print(store.token)
"""


def test_a_process_started_by_the_holder_writes_under_its_lock(tmp_path):
    """A local Dask cluster's workers, a process pool: started by the planning process,
    they are shard writers of its run without being handed the token."""
    path = tmp_path / "s"
    store, _, _ = _filled(path)  # this process holds the lock
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {CHILD_WRITER!r}, {str(path)!r}], check=True)"
    out = subprocess.run([sys.executable, "-c", grandchild], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == store.token
    assert store.native(6)["t3_b1"].sum() == 64 and store.verify() == []
    plan = (f"import sys; from ddps_core.features import open_or_create; "
            f"print(open_or_create(sys.argv[1], **{SETTINGS!r}).token)")  # planning in a worker
    out = subprocess.run([sys.executable, "-c", plan, str(path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == store.token, out.stderr[-2000:]


def test_writer_handles_of_one_process_share_its_lock(tmp_path):
    path = tmp_path / "s"
    store, feats, labels = _filled(path)
    other = FeatureStore.open(path)  # another thread's handle, say
    other.write_shard(2, {n: f[6:] for n, f in feats.items()}, labels[6:])
    assert other.token == store.token
    again = open_or_create(path, **SETTINGS)  # this process's run plans again
    assert again.token == store.token and again.repaired == []


def test_settings_change_of_a_store_nobody_writes_is_a_config_error(tmp_path):
    _filled(tmp_path / "s")[0].release()
    with pytest.raises(ConfigError, match="model_id"):
        open_or_create(tmp_path / "s", **{**SETTINGS, "model_id": "other"})


def test_lock_on_an_object_store(tmp_path):
    url = f"memory://ddps-{uuid.uuid4().hex[:8]}/s.zarr"
    store, feats, labels = _filled(url)
    fs, root = storage.filesystem(url)
    assert Holder.parse(fs.cat_file(f"{root}/writer.lock")).pid == os.getpid()
    assert store.release() and not fs.exists(f"{root}/writer.lock")  # a free lock is no object

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, host, outcome in ((int(dead.stdout), HOST, "taken over"), (alive.pid, HOST, "refused"),
                                   (os.getpid(), "another-host", "refused")):
            fs.pipe_file(f"{root}/writer.lock", Holder(host, pid, "ddps features extract", "t0", "then").to_bytes())
            if outcome == "taken over":
                assert open_or_create(url, **SETTINGS).release()
                continue
            with pytest.raises(DataError, match=f"pid {pid} on {host} since then \\(ddps features extract\\)"):
                open_or_create(url, **SETTINGS)
    finally:
        alive.kill()
        alive.wait()
    assert fs.cat_file(f"{root}/writer.lock") != b""


def test_no_process_wide_zarr_setting_changes(tmp_path):
    store, _, _ = _filled(tmp_path / "s")
    store.native(0)
    assert zarr.config.get("array.write_empty_chunks") is False
    assert zarr.config.get("codec_pipeline.batch_size") == 1
