"""Benchmark: feature extraction into the store against bare UNet forwards, same images.

(a) the store path: store creation, read + square + preprocess the images, hooked forwards
    at every step, float16 conversion, whole-shard writes through zarr with fsync, completion
    records (deleting the store afterwards is not timed);
(b) the baseline: the bare UNet forward (full network, ``out`` head included) on the same
    preprocessed batches at the same steps, nothing else.
Target: (a) / (b) <= 1.3.

And the pixel sampler reading such a store (:func:`run_sampler`): pixels per second of one
epoch, against the same sampler over the same native maps held in memory.
"""

from __future__ import annotations

import shutil
import statistics
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
from ddps_core.features import FeatureExtractor, extract_to_store, open_or_create, preprocess  # noqa: E402


def run(n_images: int = 128, preset: str = "tiny32", steps=(10, 50, 100), batch_size: int = 16,
        repeats: int = 7, overrides: dict | None = None) -> list[dict]:
    """One row; ``overrides`` change the preset (e.g. ``{"num_channels": 64}``: a wider UNet,
    4x the forward FLOPs for 2x the feature bytes, to see how the overhead scales)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        make_synthetic(tmp / "ds", n_unlabeled=0, n_labeled=n_images, n_test=1)
        reader = DDPMSegFolder(tmp / "ds", "train")
        cfg = get_preset(preset, **(overrides or {}))
        torch.manual_seed(0)
        model = cfg.build().eval()
        diffusion = GaussianDiffusion.from_name("linear", 1000)
        ext = FeatureExtractor(model, diffusion, list(steps), None, model_id="bench")
        S = cfg.image_size

        def store_path() -> Path:
            path = tmp / f"store-{time.perf_counter_ns()}.zarr"
            store = open_or_create(path, **ext.store_settings(), image_ids=list(reader.ids),
                                   shard_images=batch_size, num_classes=reader.num_classes,
                                   ignore_index=255)
            extract_to_store(reader, ext, store, batch_size=batch_size)
            store.release()
            return path

        batches = [torch.stack([preprocess(reader[i].image, S)
                                for i in range(b, min(b + batch_size, n_images))])
                   for b in range(0, n_images, batch_size)]
        noise = ext.noise

        def bare() -> None:
            with torch.inference_mode():
                for x in batches:
                    for t in steps:
                        tt = torch.full((x.shape[0],), t, dtype=torch.long)
                        model(diffusion.q_sample(x, tt, noise.expand_as(x)), tt)

        cpu: list[tuple[float, float]] = []  # (ours, bare) CPU seconds of the process, per pair
        cpu_s: list[float] = []

        def timed(fn) -> float:
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
            cpu_s.append(time.process_time() - c0)
            if isinstance(out, Path):  # a store: removed outside the timed region
                shutil.rmtree(out)
            return seconds

        # Interleaved pairs after a warm-up of each, so that a noisy neighbour slows both
        # alike, and in alternating order (ours first, then bare first), so that a drift of
        # the machine's speed under other jobs' load does not always favour one side. The
        # ratio is the median of the pair ratios. The CPU time of both sides (every thread
        # of the process) is recorded too: on a shared machine it varies less than the wall
        # time.
        timed(store_path), bare()
        pairs = []
        for i in range(repeats):
            cpu_s.clear()
            if i % 2:
                base_s = timed(bare)
                pairs.append((timed(store_path), base_s))
                cpu.append((cpu_s[1], cpu_s[0]))
            else:
                pairs.append((timed(store_path), timed(bare)))
                cpu.append((cpu_s[0], cpu_s[1]))
        ours = statistics.median(p[0] for p in pairs)
        base = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(a / b for a, b in pairs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [{
        "name": f"extract/{preset}" + "".join(f"-{k}={v}" for k, v in sorted((overrides or {}).items())),
        "figure": "seconds to extract", "value": ours, "unit": "s",
        "baseline": "bare UNet forwards, same images and steps", "baseline_value": base,
        "ratio": ratio, "target": "<= 1.3x",
        "settings": {"n_images": n_images, "steps": list(steps), "batch_size": batch_size,
                     "overrides": overrides or {}, "blocks": "all", "images_per_s": n_images / ours,
                     "repeats": repeats, "torch_threads": torch.get_num_threads(),
                     "pair_ratios": sorted(round(a / b, 3) for a, b in pairs),
                     "cpu_s": statistics.median(c[0] for c in cpu),
                     "baseline_cpu_s": statistics.median(c[1] for c in cpu),
                     "cpu_ratio": statistics.median(a / b for a, b in cpu),
                     "cpu_pair_ratios": sorted(round(a / b, 3) for a, b in cpu)},
    }]


class _InMemory:
    """The store's images held in memory (native maps and labels read beforehand): the
    sampler's baseline, its work without the store's reads."""

    def __init__(self, store) -> None:
        for key in ("image_size", "feature_dim", "names", "shapes", "has_labels", "image_ids", "path"):
            setattr(self, key, getattr(store, key))
        self._natives = [store.native(i) for i in range(len(store))]
        self._labels = [store.label(i) for i in range(len(store))]

    def __len__(self) -> int:
        return len(self._labels)

    def native(self, i: int) -> dict:
        return self._natives[i]

    def label(self, i: int):
        return self._labels[i]

    def pixels(self, i, ys, xs, native=None):
        from ddps_core.features import FeatureStore

        return FeatureStore.pixels(self, i, ys, xs, native)


def run_sampler(n_images: int = 64, preset: str = "tiny32", steps=(10, 50, 100), batch_size: int = 64,
                buffer_images: int = 8, repeats: int = 7) -> list[dict]:
    """One row: pixels per second of one :class:`PixelSampler` epoch over a store of
    ``n_images`` extracted images (read from the store, upsampled on demand), against the same
    sampler over the same native maps held in memory (interleaved, alternating order)."""
    from ddps_core.features import FeatureStore, PixelSampler

    tmp = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    try:
        make_synthetic(tmp / "ds", n_unlabeled=0, n_labeled=n_images, n_test=1)
        reader = DDPMSegFolder(tmp / "ds", "train")
        cfg = get_preset(preset)
        torch.manual_seed(0)
        ext = FeatureExtractor(cfg.build().eval(), GaussianDiffusion.from_name("linear", 1000),
                               list(steps), None, model_id="bench")
        store = open_or_create(tmp / "train.zarr", **ext.store_settings(), image_ids=list(reader.ids),
                               shard_images=16, num_classes=reader.num_classes, ignore_index=255)
        extract_to_store(reader, ext, store, batch_size=16)
        store.release()
        store = FeatureStore.open(tmp / "train.zarr", read_only=True)
        memory = _InMemory(store)

        def epoch(source) -> tuple[float, int]:
            sampler = PixelSampler(source, batch_size=batch_size, buffer_images=buffer_images,
                                   min_class_pixels=1)
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in sampler)
            return time.perf_counter() - t0, n

        epoch(store), epoch(memory)
        pairs = []
        for i in range(repeats):
            if i % 2:
                mem = epoch(memory)
                pairs.append((epoch(store), mem))
            else:
                pairs.append((epoch(store), epoch(memory)))
        n_pixels = pairs[0][0][1]
        ours = statistics.median(n_pixels / p[0][0] for p in pairs)
        base = statistics.median(n_pixels / p[1][0] for p in pairs)
        ratio = statistics.median(p[1][0] / p[0][0] for p in pairs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [{
        "name": f"extract/sampler-{preset}", "figure": "pixels per second, one sampler epoch",
        "value": ours, "unit": "pixels/s",
        "baseline": "the same sampler over the native maps held in memory", "baseline_value": base,
        "ratio": ratio, "target": None,
        "settings": {"n_images": n_images, "steps": list(steps), "batch_size": batch_size,
                     "buffer_images": buffer_images, "n_pixels": n_pixels, "repeats": repeats,
                     "pixels_per_s": sorted(round(n_pixels / p[0][0]) for p in pairs)},
    }]


if __name__ == "__main__":
    for row in run():
        print(row)
    for row in run_sampler():
        print(row)
