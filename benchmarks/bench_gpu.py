"""Benchmark (CUDA): the 256 configuration's extraction against its bare forwards and the
GPU's bf16 peak; ensemble training pixels/s; DDPS refinement images/s.

Extraction, ``adm-256-lsun`` with random weights, bf16 autocast, the pipeline's memory layout
(contiguous; channels-last too, for the comparison), the configuration's features (blocks 5,
6, 7, 8, 12; steps 50, 150, 250; docs/method.md):

- ``forward``: the bare UNet (full network, ``out`` head included) on the same batches at the
  same steps. Its rate is the baseline of every extraction row. Its FLOPs
  (``torch.utils.flop_counter``, a multiply-add = 2) against the datasheet's dense bf16 peak
  give the fraction of peak; the largest power-of-two batch that fits is found first.
- ``hooked``: the extractor's forwards (stopping after block 12), outputs dropped;
- ``into-pageable`` / ``into-pinned``: :meth:`FeatureExtractor.extract_into` into ordinary /
  pinned shard buffers (synchronous copies / copies on a side stream);
- ``store``: the whole store path (:func:`extract_to_store`: reads, forwards, copies, shard
  writes with fsync, done flags), whose rate is bounded by the disk: its measured
  sequential write rate with fsync is recorded beside it.

Target: extraction >= 70% of the forward-only rate at the same settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.datasets import DDPMSegFolder, make_synthetic  # noqa: E402
from ddps_core.device import autocast, memory_format  # noqa: E402
from ddps_core.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from ddps_core.diffusion.presets import get_preset  # noqa: E402
from ddps_core.features import FeatureExtractor, extract_to_store, open_or_create, preprocess  # noqa: E402

from benchmarks.bench_unet import GPU_BF16_PEAK, _sync, _times, matmul_rate  # noqa: E402


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def disk_write_rate(folder: Path, nbytes: int = 2 << 30) -> float:
    """Sequential write rate (bytes/s) of ``folder``'s file system, fsync included."""
    buf = os.urandom(min(64 << 20, nbytes))
    path = folder / "disk-probe.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(max(1, nbytes // len(buf))):
            fh.write(buf)
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, nbytes // len(buf)) * len(buf) / seconds


def largest_batch(fwd: Callable[[int], object], dev: torch.device, start: int,
                  cap: int) -> tuple[int, dict[int, float | str]]:
    """The largest power-of-two batch in ``start..cap`` whose bare forward runs (fits in
    memory), and the images/s of each batch tried (one forward after a warm-up each; the
    error of the first that failed)."""
    rates: dict[int, float | str] = {}
    best = 0
    b = start
    while b <= cap:
        try:
            fwd(b)
            _sync(dev)
            t0 = time.perf_counter()
            fwd(b)
            _sync(dev)
            rates[b] = b / (time.perf_counter() - t0)
            best = b
        except Exception as exc:  # noqa: BLE001 - out of memory (or a kernel's size limit) ends the search
            if not _is_oom(exc) and not best:
                raise
            rates[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            break
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        b *= 2
    if not best:
        raise RuntimeError(f"not even a batch of {start} fits")
    return best, rates


def extraction(device: str = "cuda", preset: str = "adm-256-lsun", steps=(50, 150, 250),
               blocks=(5, 6, 7, 8, 12), batch: int | None = 64, max_batch: int = 256,
               n_batches: int = 2, repeats: int = 5, store_repeats: int = 2,
               variants: tuple[str, ...] = ("hooked", "into-pageable", "into-pinned", "store"),
               channels_last: bool | None = None, probe_bytes: int = 2 << 30, matmul_n: int | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
    """The extraction rows (see the module docstring). ``batch``: the extraction batch and
    shard size (None: the largest batch that fits), capped by the largest that fits;
    ``n_batches``: batches (= shards) per timed run; ``variants``: which extraction paths are
    timed besides the bare forwards; ``channels_last``: the UNet's layout (None: the
    extractor's default), for both sides; ``probe_bytes``: the disk probe's size;
    ``matmul_n``: the size of the matmul that measures the attainable rate."""
    dev = torch.device(device)
    fmt = memory_format(channels_last)
    cfg = get_preset(preset, use_fp16=False)
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the device: the 256 model has 553 M parameters
        model = cfg.build()
    model = model.eval().to(memory_format=fmt)
    diffusion = GaussianDiffusion.from_name("linear", 1000)
    ext = FeatureExtractor(model, diffusion, list(steps), list(blocks), device=dev, model_id="bench",
                           channels_last=channels_last)
    S = cfg.image_size

    one = torch.randn(1, 3, S, S, device=dev).contiguous(memory_format=fmt)
    t1 = torch.full((1,), int(steps[0]), device=dev, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(one, t1)
    full_flops = int(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        ext._run_steps(one, lambda t, b, out: None)
    hooked_flops = int(counter.get_total_flops()) // len(steps)
    log(f"forward {full_flops / 1e9:.0f} GFLOP/image, hooked {hooked_flops / 1e9:.0f} GFLOP/image/step")

    def bare_batch(xb: torch.Tensor) -> None:
        with torch.inference_mode():
            noise = ext.noise.to(dev).expand_as(xb)
            for t in steps:
                tt = torch.full((xb.shape[0],), int(t), dtype=torch.long, device=dev)
                xt = diffusion.q_sample(xb, tt, noise).contiguous(memory_format=fmt)
                with autocast(dev):
                    model(xt, tt)

    def fwd_only(b: int) -> None:
        with torch.inference_mode(), autocast(dev):
            x = torch.randn(b, 3, S, S, device=dev).contiguous(memory_format=fmt)
            model(x, torch.full((b,), int(steps[0]), device=dev, dtype=torch.long))

    b_max, curve = largest_batch(fwd_only, dev, 8, max_batch)
    B = b_max if batch is None else min(batch, b_max)
    log(f"largest batch {b_max}; img/s by batch {curve}; extraction batch {B}")
    peak = next((v for k, v in GPU_BF16_PEAK.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)), None)
    measured_peak = matmul_rate(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, n=matmul_n)

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows: list[dict] = []
    try:
        n_images = B * n_batches
        # the synthetic domain's largest size is 128: the reader squares them up to S, as the
        # store path does with any image
        make_synthetic(tmp / "ds", image_size=min(S, 128), n_unlabeled=0, n_labeled=n_images, n_test=1)
        reader = DDPMSegFolder(tmp / "ds", "train")
        cpu_batches = [torch.stack([preprocess(reader[i].image, S) for i in range(k * B, (k + 1) * B)])
                       for k in range(n_batches)]
        shapes = ext.shapes()
        per_image_bytes = sum(2 * math.prod(s) for s in shapes.values())

        def forward() -> None:  # the inputs start on the CPU, as the extractor's do
            for x in cpu_batches:
                bare_batch(x.to(dev, torch.float32))

        def hooked() -> None:
            for x in cpu_batches:
                ext._run_steps(x, lambda t, b, out: None)

        bufs = {"into-pageable": {n: np.empty((B, *s), np.float16) for n, s in shapes.items()},
                "into-pinned": ext.shard_buffers(shapes, B)}
        is_pinned = dev.type == "cuda" and torch.from_numpy(next(iter(bufs["into-pinned"].values()))).is_pinned()

        def into(name: str) -> Callable[[], None]:
            def go() -> None:
                for x in cpu_batches:
                    ext.extract_into(x, bufs[name], 0)
            return go

        # the two copy paths give the same bytes
        for buffers in bufs.values():
            ext.extract_into(cpu_batches[0], buffers, 0)
        same = all(np.array_equal(bufs["into-pageable"][n], bufs["into-pinned"][n]) for n in shapes)

        def store_path() -> None:
            path = tmp / f"store-{time.perf_counter_ns()}.zarr"
            store = open_or_create(path, **ext.store_settings(), image_ids=list(reader.ids),
                                   shard_images=B, num_classes=reader.num_classes, ignore_index=255)
            extract_to_store(reader, ext, store, batch_size=B)
            _sync(dev)
            store.release()
            shutil.rmtree(path)  # (inside the timing: a few ms against seconds of writes)

        timed: dict[str, list[float]] = {}
        for name, fn, reps in (("forward", forward, repeats), ("hooked", hooked, repeats),
                               ("into-pageable", into("into-pageable"), repeats),
                               ("into-pinned", into("into-pinned"), repeats), ("store", store_path, store_repeats)):
            if name != "forward" and name not in variants:
                continue
            if name == "store":
                bufs.clear()  # the store path allocates its own shard buffers
            try:
                timed[name] = _times(fn, dev, reps)
                log(f"{name}: {n_images / statistics.median(timed[name]):.1f} img/s "
                    f"({[round(t, 3) for t in timed[name]]} s)")
            except Exception as exc:  # noqa: BLE001 - report the others
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        disk = disk_write_rate(tmp, probe_bytes)
        log(f"disk write rate with fsync: {disk / 1e9:.2f} GB/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    layout = "channels_last" if fmt == torch.channels_last else "contiguous"
    base_s = statistics.median(timed["forward"])
    fwd_rate = n_images / base_s
    common = {"preset": preset, "steps": list(steps), "blocks": list(blocks), "batch": B,
              "largest_batch": b_max, "forward_img_s_by_batch": curve, "n_images": n_images,
              "dtype": "bf16 autocast", "memory_format": layout,
              "gflops_forward": full_flops / 1e9, "gflops_hooked_per_step": hooked_flops / 1e9,
              "datasheet_bf16_peak": peak, "measured_matmul_rate": measured_peak,
              "feature_mb_per_image": per_image_bytes / 1e6}
    rows.append({
        "name": f"gpu/unet_forward-{preset}-{layout}", "figure": "images_per_s (one forward each)",
        "value": B / (base_s / (n_batches * len(steps))), "unit": "img/s",
        "baseline": "dense bf16 peak (datasheet)" if peak else "dense matmul rate (measured)",
        "baseline_value": peak or measured_peak,
        "ratio": full_flops * n_images * len(steps) / base_s / (peak or measured_peak),
        "settings": common | {"fraction_of_measured_matmul": full_flops * n_images * len(steps) / base_s / measured_peak,
                              "times_s": timed["forward"]},
    })
    for name in ("hooked", "into-pageable", "into-pinned", "store"):
        if name not in timed:
            continue
        sec = statistics.median(timed[name])
        extra = {"times_s": timed[name],
                 # the FLOPs the extractor does (it stops after the last hooked block) ...
                 "fraction_of_peak": hooked_flops * n_images * len(steps) / sec / (peak or measured_peak),
                 # ... and those of as many full forwards
                 "fraction_of_peak_in_forward_flops": full_flops * n_images * len(steps) / sec / (peak or measured_peak)}
        if name.startswith("into"):
            extra |= {"pinned": is_pinned if name == "into-pinned" else False, "same_bytes_as_pageable": same}
        if name == "store":
            extra |= {"disk_write_gb_s": disk / 1e9,
                      "feature_gb_s": per_image_bytes * n_images / sec / 1e9}
        rows.append({
            "name": f"gpu/extract-{name}-{preset}-{layout}", "figure": "images_per_s (3 steps each)",
            "value": n_images / sec, "unit": "img/s",
            "baseline": "bare UNet forwards, same batches and steps", "baseline_value": fwd_rate,
            "ratio": (n_images / sec) / fwd_rate, "target": ">= 0.7x" if name in ("into-pinned", "store") else None,
            "settings": common | extra,
        })
    return rows


def ensemble(device: str = "cuda", feature_dim: int = 8448, num_classes: int = 20, batches=(64, 4096),
             n_updates: int = 200, repeats: int = 3) -> list[dict]:
    """Pixel-MLP ensemble (10 members) training updates/s x batch = pixels/s, from batches
    already on the device (the trainer's own rate: no feature reads; 8 distinct batches
    cycled). The reference's batch is 64 pixels."""
    from ddps_core.teacher import PixelEnsemble
    from ddps_core.teacher.train import train_ensemble

    dev = torch.device(device)
    rows = []
    for B in batches:
        gen = torch.Generator(device=dev).manual_seed(0)
        xs = torch.randn(8, B, feature_dim, device=dev, generator=gen)
        ys = torch.randint(0, num_classes, (8, B), device=dev, generator=gen)

        def epoch(_e: int):
            return ((xs[i % 8], ys[i % 8]) for i in range(n_updates))

        def one() -> None:
            ens = PixelEnsemble(feature_dim, num_classes, members=10, seed=0).to(dev)
            train_ensemble(epoch, ens, max_epochs=1, patience=10**9)

        sec = statistics.median(_times(one, dev, repeats))
        rows.append({
            "name": f"gpu/ensemble_train-b{B}", "figure": "pixels_per_s (10 members)",
            "value": n_updates * B / sec, "unit": "px/s", "baseline": None, "baseline_value": None,
            "ratio": None, "settings": {"feature_dim": feature_dim, "num_classes": num_classes, "batch": B,
                                        "updates": n_updates, "repeats": repeats, "source": "batches on the device"},
        })
    return rows


def ddps(device: str = "cuda", sizes=((32, 32), (32, 256)), cpu_draws: tuple[int, int] | None = (32, 256)) -> list[dict]:
    """DDPS refinement images/s (:mod:`benchmarks.bench_ddps`) at (batch, size) pairs, with
    the stage's draws on the device; ``cpu_draws``: one (batch, size) also with the draws
    on the CPU (the stage's way before 2026-12-04, for the comparison)."""
    from benchmarks import bench_ddps

    runs = [(batch, size, "device") for batch, size in sizes]
    if cpu_draws is not None:
        runs.append((*cpu_draws, "cpu"))
    rows = []
    for batch, size, generator in runs:
        for row in bench_ddps.run(batch=batch, size=size, device=device, generator=generator):
            row["name"] = "gpu/" + row["name"] + f"-{size}px"
            rows.append(row)
    return rows


def run(device: str = "cuda", log: Callable[[str], None] = print) -> list[dict]:
    """Every part; a part that fails is reported and the others still run."""
    rows: list[dict] = []
    for name, part in (("extraction", lambda: extraction(device=device, log=log)),
                       ("extraction-channels-last", lambda: extraction(device=device, log=log, channels_last=True,
                                                                       variants=("into-pinned",))),
                       ("ensemble", lambda: ensemble(device=device)), ("ddps", lambda: ddps(device=device))):
        try:
            got = part()
            for row in got:  # in the log too, should the run be cut short before the table
                log("row " + json.dumps(row, default=str))
            rows += got
        except Exception as exc:  # noqa: BLE001
            import traceback

            log(f"{name} FAILED:\n{traceback.format_exc()}")
            rows.append({"name": f"gpu/{name}-failed", "figure": "error", "value": None, "unit": None,
                         "baseline": None, "baseline_value": None, "ratio": None,
                         "settings": {"error": f"{type(exc).__name__}: {exc}"[:500]}})
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
