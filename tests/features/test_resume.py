"""Kill-and-resume of feature extraction: a worker SIGKILLed at random moments leaves a store
that always reads cleanly, and rerunning finishes it bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddps_core.features import FeatureStore, open_or_create

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 24
SHARD_IMAGES = 4

pytestmark = pytest.mark.usefixtures("one_thread")


class _SlowImages:
    """24 deterministic images with labels; each read sleeps a little so that a run lasts
    long enough to be killed in the middle."""

    def __init__(self, delay: float):
        self.delay = delay

    def __len__(self) -> int:
        return N_IMAGES

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        rng = np.random.default_rng(1000 + i)
        return rng.integers(0, 256, (36, 32, 3), dtype=np.uint8), rng.integers(0, 3, (36, 32)).astype(np.uint8)


def run_extraction(store_path: str, ckpt: str, delay: float = 0.0) -> None:
    """The worker: open (or create) the store and fill it. Runs in a subprocess in the test."""
    torch.set_num_threads(1)
    from ddps_core.diffusion import GaussianDiffusion, load_unet
    from ddps_core.features import FeatureExtractor, extract_to_store, open_or_create

    model = load_unet(ckpt, preset="small32-spec")
    fe = FeatureExtractor(model, GaussianDiffusion.from_name("linear", 1000), [10, 100], None, noise_seed=0)
    store = open_or_create(
        store_path, image_ids=[f"img{i:02d}" for i in range(N_IMAGES)], shard_images=SHARD_IMAGES,
        num_classes=3, ignore_index=255, **fe.store_settings(),
    )
    extract_to_store(_SlowImages(delay), fe, store, batch_size=2, progress=lambda n: print("done", n, flush=True))


def _checkpoint(path: Path) -> Path:
    from ddps_core.diffusion import get_preset, randomize_zero_init_

    torch.manual_seed(99)
    model = get_preset("small32-spec").build()
    randomize_zero_init_(model, torch.Generator().manual_seed(3))
    torch.save(model.state_dict(), path)
    return path


def _done_shards(store_path: Path) -> int:
    """Shards with a completion record (one file ``c.<k>.0`` per shard)."""
    folder = store_path / "done"
    return len([f for f in os.listdir(folder) if f.startswith("c.")]) if folder.is_dir() else 0


def _spawn(store_path: Path, ckpt: Path, delay: float) -> subprocess.Popen:
    code = (
        "from tests.features.test_resume import run_extraction; "
        f"run_extraction({str(store_path)!r}, {str(ckpt)!r}, {delay!r})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _check_readable(store_path: Path, reference: FeatureStore) -> int:
    """Every image of a (possibly interrupted) store reads without error; done ones are exact."""
    if not (store_path / "zarr.json").exists():
        return 0
    store = FeatureStore.open(store_path)
    done = store.done_mask()
    for i in range(len(store)):
        native = store.native(i)  # must never raise, done or not
        store.label(i)
        if done[i]:
            ref = reference.native(i)
            for name, arr in native.items():
                np.testing.assert_array_equal(arr, ref[name])
            np.testing.assert_array_equal(store.label(i), reference.label(i))
    # completion is per shard: a shard is all done or all not done
    assert all(done[a:b].all() or not done[a:b].any() for a, b in (store.shard_range(k) for k in range(store.num_shards)))
    return int(done.sum())


def test_kill_and_resume_is_bit_identical(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt")
    ref_path = tmp_path / "reference"
    run_extraction(str(ref_path), str(ckpt))  # uninterrupted, in this process (1 thread)
    reference = FeatureStore.open(ref_path, read_only=True)
    assert reference.is_complete()

    path = tmp_path / "killed"
    rng = random.Random(20240611)
    n_shards = N_IMAGES // SHARD_IMAGES
    kills, done_before, history = 0, 0, []
    # kill moments: just after the store exists (first shard in flight), then after 2 and 3
    # finished shards, each plus a random delay (so sometimes in the middle of a shard write)
    for target in (0, 2, 3):
        proc = _spawn(path, ckpt, delay=0.04)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and (
            not (path / "zarr.json").exists() or _done_shards(path) < target
        ):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
        done = _check_readable(path, reference)
        assert done >= done_before  # a rerun keeps what was finished
        done_before = done
        history.append(done)
    print(f"\nimages done after each kill: {history}")
    assert kills >= 2

    proc = _spawn(path, ckpt, delay=0.0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    final = FeatureStore.open(path)
    assert final.is_complete() and final.num_shards == n_shards
    assert final.attrs == reference.attrs
    for name in ("features", "labels", "done"):  # the completion records hold the same CRCs
        a = final._group[name][:]
        b = reference._group[name][:]
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes(), name  # bit-identical
    # the temporary files of killed writers are gone: each folder holds its chunks only
    for name in ("features", "labels", "done"):
        assert sorted(os.listdir(path / name)) == sorted(["zarr.json"] + [f"c.{k}.0" + ".0" * (name == "labels")
                                                                          for k in range(n_shards)]), name


def test_undone_shard_with_garbage_files_is_rewritten(tmp_path):
    """Whatever a crashed writer left in a shard that is not marked done (a truncated file
    under the final name, as a non-atomic store could leave, or zarr's temporary files) never
    counts as data: the next run removes the temporary files when it takes the lock, and the
    shard's writer replaces the rest."""
    shapes = {"t3_b0": (2, 4, 4), "t3_b1": (1, 8, 8)}
    settings = dict(model_id="m", steps=[3], blocks=[0, 1], image_size=8,
                    image_ids=[str(i) for i in range(6)], shapes=shapes, shard_images=3)
    store = FeatureStore.create(tmp_path / "s", **settings)
    rng = np.random.default_rng(0)
    data = {k: {n: rng.standard_normal((3, *s)).astype(np.float16) for n, s in shapes.items()} for k in (0, 1)}
    store.write_shard(0, data[0])
    features = tmp_path / "s" / "features"
    good = (features / "c.0.0").read_bytes()
    bad = features / "c.1.0"
    bad.write_bytes(good[: len(good) // 2])  # truncated, under the final name
    strays = [features / "c.1.0123abcd.partial", tmp_path / "s" / "done" / "c.1.0.tmp"]
    for stray in strays:
        stray.write_bytes(b"junk")
    store.release()  # the killed run's process is gone

    store = open_or_create(tmp_path / "s", **settings)  # the next run
    assert not any(stray.exists() for stray in strays) and bad.exists()
    assert store.done_mask().tolist() == [True] * 3 + [False] * 3 and store.repaired == []
    np.testing.assert_array_equal(store.native(2)["t3_b0"], data[0]["t3_b0"][2].astype(np.float32))
    store.write_shard(1, data[1])  # the resumed writer owns shard 1
    assert store.is_complete() and (features / "c.0.0").read_bytes() == good
    for i in range(3, 6):
        for n in shapes:
            np.testing.assert_array_equal(store.native(i)[n], data[1][n][i - 3].astype(np.float32))
