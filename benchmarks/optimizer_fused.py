"""Benchmark: training-step time of the student and the DDPM with AdamW's for-loop update
(torch's default on the CPU) against its fused kernel (``fused=True``).

Each model takes ``--steps`` full steps (forward, backward, clipping where its trainer clips,
AdamW) on random batches of ``params.yaml``'s sizes (the student: ``student.image_size``,
``student.batch_size``; the DDPM: its preset, ``ddpm.batch_size``, the hybrid loss), the two
optimisers interleaved over ``--repeats`` rounds, after one warm-up round each::

    python -m benchmarks.optimizer_fused [--steps 20] [--repeats 3]

Prints the median seconds per step of each and the saving in percent. Run it alone: two
PyTorch processes on a 2-core machine slow each other down many times over.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ddps_core.config import load_settings

REPO = Path(__file__).resolve().parents[1]


def _student_step(settings, fused: bool) -> Callable[[], None]:
    from ddps_core.student.model import build_student
    from ddps_core.student.train import param_groups

    cfg = settings.student
    torch.manual_seed(0)
    model = build_student(cfg, 7).train()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    size = cfg.image_size or 64
    x = torch.rand(cfg.batch_size, 3, size, size)
    y = torch.randint(0, 7, (cfg.batch_size, size, size))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _ddpm_step(settings, fused: bool) -> Callable[[], None]:
    from ddps_core.diffusion.gaussian import GaussianDiffusion
    from ddps_core.diffusion.presets import get_preset

    cfg = settings.ddpm
    torch.manual_seed(0)
    unet_cfg = get_preset(cfg.preset)
    model = unet_cfg.build().train()
    diffusion = GaussianDiffusion.from_name(cfg.schedule, cfg.num_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    x0 = torch.rand(cfg.batch_size, 3, unet_cfg.image_size, unet_cfg.image_size) * 2 - 1
    t = torch.randint(0, cfg.num_timesteps, (cfg.batch_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x0, t, torch.randn_like(x0))["loss"].mean().backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    settings = load_settings(REPO / "params.yaml")
    for name, make in (("student", _student_step), ("ddpm", _ddpm_step)):
        steps = {fused: make(settings, fused) for fused in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeats + 1):
            for fused, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if r:  # the first round warms up
                    times[fused].append((time.perf_counter() - t0) / args.steps)
        loop, fused = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: for-loop AdamW {loop * 1000:.1f} ms/step, fused {fused * 1000:.1f} ms/step "
              f"({100 * (loop - fused) / loop:.1f} % saved)", flush=True)


if __name__ == "__main__":
    main()
