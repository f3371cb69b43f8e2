"""Benchmark: DDPS refinement against the network forwards it cannot avoid.

(a) ``refine_images``: the student's encoder + decoder once (features and its own logits),
    then Free-Re-noising with n steps (``refinement_steps(T, n)``: n = 2 runs 3 denoiser
    forwards for T = 20), with the uniform initial mask, the re-noising draws, the argmaxes and
    the upsampling of every collected step's logits to the image size;
(b) the baseline: one bare ``features_and_logits`` of the student plus the same number of bare
    denoiser forwards on a fixed mask, nothing else.

The base is a randomly initialised student (``student.arch`` / ``student.encoder`` of
``params.yaml``, SegFormer-B0 by default) and the denoiser the configured preset
(``refiner.preset`` and its overrides) for the synthetic domain's K = 7, on a batch of 32 x 32
images (speed does not depend on the weights). Target: (a) / (b) <= 1.1.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.config import load_settings  # noqa: E402
from ddps_core.device import autocast  # noqa: E402
from ddps_core.refiner.multinomial import MultinomialDiffusion, uniform_mask  # noqa: E402
from ddps_core.refiner.sample import refine_images, refinement_steps  # noqa: E402
from ddps_core.refiner.stage import _denoiser_config, train_config  # noqa: E402
from ddps_core.student.model import Student  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(batch: int = 32, size: int | None = None, num_classes: int = 7, ns: tuple[int, ...] | None = None,
        repeats: int = 7, device: str = "cpu", params: Path | None = REPO / "params.yaml",
        generator: str = "device") -> list[dict]:
    """One row per n in ``ns`` (default: ``refiner.refine_steps`` and n = T, every step
    collected, where the sampler's own work weighs most against the forwards). Images are
    the student's input size (``student.image_size``, else the diffusion model's), and the
    guidance is ``refiner.guidance``: a guided step is one forward of the doubled batch, in the
    baseline too. ``generator``: where the sampler's random draws are made, ``device`` (what
    the refine stage does) or ``cpu`` (the same draws on any device; slower on a GPU)."""
    from ddps_core.diffusion.presets import get_preset

    settings = load_settings(params if params is not None and params.exists() else None)
    size = size or settings.student.image_size or get_preset(settings.ddpm.preset).image_size
    w = settings.refiner.guidance
    dev = torch.device(device)
    torch.manual_seed(0)
    base = Student(settings.student.arch, settings.student.encoder, num_classes).to(dev).eval()
    tc = train_config(settings)
    config = _denoiser_config(tc, num_classes, base.feature_channels)
    denoiser = config.build().to(dev).eval()
    schedule = MultinomialDiffusion(num_classes, tc.num_timesteps, tc.schedule)
    ns = (settings.refiner.refine_steps, schedule.num_timesteps) if ns is None else ns
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    h = -(-size // 4)
    mask = uniform_mask((batch, h, h), num_classes, torch.Generator().manual_seed(1), dev)
    rows = []
    for n in dict.fromkeys(ns):
        steps = refinement_steps(schedule.num_timesteps, n)

        def ours(steps=steps) -> None:
            gen = torch.Generator(device=dev if generator == "device" else "cpu").manual_seed(2)
            refine_images(base, denoiser, schedule, images, steps=steps, guidance=w, generator=gen)

        def bare(steps=steps) -> None:
            with torch.inference_mode(), autocast(dev):
                feats, _ = base.features_and_logits(images)
                x, f = (mask, feats) if w == 0 else (torch.cat([mask, mask]), torch.cat([feats, feats]))
                for i in steps:
                    denoiser(x, torch.full((x.shape[0],), i, dtype=torch.long, device=dev), f)

        def timed(fn) -> float:
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            return time.perf_counter() - t0

        # warm-up, then interleaved pairs so that machine noise hits both sides alike
        for _ in range(2):
            ours(), bare()
        pairs = [(timed(ours), timed(bare)) for _ in range(max(repeats, 5))]
        t_ours = statistics.median(p[0] for p in pairs)
        t_bare = statistics.median(p[1] for p in pairs)
        rows.append({
            "name": f"ddps/refine-{settings.refiner.preset}-n{n}" + ("-cpugen" if generator == "cpu" else ""),
            "figure": f"seconds per batch of {batch} at {size} px ({len(steps)} denoiser steps, w = {w})",
            "value": t_ours, "unit": "s",
            "baseline": f"1 bare student forward + {len(steps)} bare denoiser forwards"
                        + ("" if w == 0 else " (doubled batch: guidance)"), "baseline_value": t_bare,
            "ratio": statistics.median(a / b for a, b in pairs), "target": "<= 1.1x",
            "settings": {"batch": batch, "size": size, "num_classes": num_classes, "n": n, "steps": steps,
                         "guidance": w, "generator": generator,
                         "num_timesteps": schedule.num_timesteps, "denoiser": config.to_dict(),
                         "student": f"{settings.student.arch}/{settings.student.encoder}",
                         "images_per_s": batch / t_ours, "repeats": len(pairs)},
        })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
