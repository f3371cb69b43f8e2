"""Benchmark: pixel-MLP ensemble training.

(1) Time of one epoch: 10 members in one module (one wide matmul, batched later layers)
    against 1 member on the same batches (target <= 2x), and against 10 sequential
    single-member trainings (the reference's way).
(2) Peak RSS of training with 200 against 20 labelled images (target <= 1.15x), each in its
    own process (``ru_maxrss``); plus the reference's in-memory layout (every training
    image's upsampled float32 features in one tensor), computed from the shapes.

Features come from a randomly initialised ``tiny32`` UNet (all blocks, steps 10/50/100):
speed and memory do not depend on the weights.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.datasets import DDPMSegFolder, make_synthetic  # noqa: E402
from ddps_core.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from ddps_core.diffusion.presets import get_preset  # noqa: E402
from ddps_core.features import FeatureExtractor, FeatureStore, PixelSampler, extract_to_store, open_or_create  # noqa: E402
from ddps_core.teacher import PixelEnsemble  # noqa: E402
from ddps_core.teacher.train import train_ensemble  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_store(root: Path, n_images: int) -> Path:
    make_synthetic(root / "ds", n_unlabeled=0, n_labeled=n_images, n_test=1)
    reader = DDPMSegFolder(root / "ds", "train")
    torch.manual_seed(0)
    ext = FeatureExtractor(get_preset("tiny32").build().eval(), GaussianDiffusion.from_name("linear", 1000),
                           [10, 50, 100], None, model_id="bench")
    store = open_or_create(root / "train.zarr", **ext.store_settings(), image_ids=list(reader.ids),
                           shard_images=16, num_classes=reader.num_classes, ignore_index=255)
    extract_to_store(reader, ext, store, batch_size=16)
    return root / "train.zarr"


def _epoch(store: FeatureStore, members: int, n_images: int, seed: int = 0) -> float:
    sampler = PixelSampler(store, batch_size=64, seed=seed, min_class_pixels=1,
                           image_indices=list(range(n_images)))
    ens = PixelEnsemble(store.feature_dim, 7, members=members, seed=seed)
    t0 = time.perf_counter()
    train_ensemble(sampler, ens, max_epochs=1, patience=10**9)
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` of its own address space where Linux has it.

    ``ru_maxrss`` is not used there: Linux carries the parent's high-water mark into a child
    across fork + exec, so a child started by a process that once held 3.7 GB (the mBIoU
    benchmark's images) reported 3.7 GB whatever it did itself."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(store_path: str, n_images: int) -> None:
    """Child process: train 2 epochs on the first ``n_images`` images, print peak RSS (MB)."""
    store = FeatureStore.open(store_path, read_only=True)
    sampler = PixelSampler(store, batch_size=64, min_class_pixels=1, image_indices=list(range(n_images)))
    train_ensemble(sampler, PixelEnsemble(store.feature_dim, 7, members=10), max_epochs=2, patience=10**9)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def _peak_rss(store_path: Path, n_images: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench_ensemble import rss_child; "
            f"rss_child({str(store_path)!r}, {n_images})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run(repeats: int = 5, n_small: int = 20, n_large: int = 200) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ens-"))
    try:
        path = build_store(tmp, n_large)
        store = FeatureStore.open(path, read_only=True)
        _epoch(store, 10, n_small)  # warm-up
        pairs = []
        for _ in range(repeats):  # interleaved, so noise hits both alike
            pairs.append((_epoch(store, 10, n_small), _epoch(store, 1, n_small)))
        ten = statistics.median(p[0] for p in pairs)
        one = statistics.median(p[1] for p in pairs)
        sequential = sum(_epoch(store, 1, n_small, seed=m) for m in range(10))
        rss_small = statistics.median(_peak_rss(path, n_small) for _ in range(3))
        rss_large = statistics.median(_peak_rss(path, n_large) for _ in range(3))
        D, S = store.feature_dim, store.image_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref_bytes_20 = n_small * D * S * S * 4
    ref_256 = n_small * 8448 * 256 * 256 * 4
    return [
        {"name": "ensemble/time_10_vs_1", "figure": "seconds per epoch, 10 members", "value": ten,
         "unit": "s", "baseline": "1 member, same batches", "baseline_value": one,
         "ratio": statistics.median(a / b for a, b in pairs), "target": "<= 2x",
         "settings": {"n_images": n_small, "D": D, "repeats": repeats}},
        {"name": "ensemble/time_10_vs_sequential", "figure": "seconds per epoch, 10 members", "value": ten,
         "unit": "s", "baseline": "10 sequential single-member epochs (reference)", "baseline_value": sequential,
         "ratio": ten / sequential, "target": None, "settings": {"n_images": n_small}},
        {"name": "ensemble/peak_rss_200_vs_20", "figure": "peak RSS, 200 labelled images", "value": rss_large,
         "unit": "MB", "baseline": "peak RSS, 20 labelled images", "baseline_value": rss_small,
         "ratio": rss_large / rss_small, "target": "<= 1.15x",
         "settings": {"reference_in_memory_mb_20_images_here": ref_bytes_20 / 1e6,
                      "reference_in_memory_gb_20_images_256_config": ref_256 / 1e9}},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
