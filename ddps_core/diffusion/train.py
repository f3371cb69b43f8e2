"""DDPM training on a folder of unlabelled images.

AdamW with linear warm-up, an EMA of the weights whose decay ramps up with the step count
(``min(ema_rate, (1 + step) / (10 + step))``, so a short run's EMA is not still the random
initialisation), random horizontal flips, gradient clipping, and the hybrid loss (simple eps
MSE + the VLB term for the learned variance).

Everything random comes from one seeded :class:`torch.Generator` whose state is checkpointed,
so a run resumed from its last checkpoint ends with the same weights as an uninterrupted one
(on CPU). Checkpoints are written atomically every ``checkpoint_every`` steps and at the end.
A checkpoint is resumed only by a run with the same identity: the settings that change what
is trained (``_IDENTITY_FIELDS``, the seed) and the content id of the training images; a new
dataset, even with the same file names, starts over. The loop's pieces (schedule, EMA,
checkpoint, loss log, time budget) are :mod:`ddps_core.training`'s.

Output folder (``DDPMSettings.out``); identical runs write identical files (no timing in any)::

    model.json        what was trained: preset, UNet flags, schedule, inputs, model id (weights hash)
    ema.safetensors   the EMA weights: the model every later stage uses
    state.pt          resume state: weights, EMA, optimiser, step, RNG states, loss log
    loss.csv          step, loss, mse, vb, lr (one row per ``log_every`` steps)
    samples.png       a grid of samples from the EMA weights (DDIM by default)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddps_core.config import DDPMSettings, Settings
from ddps_core.datasets import DDPMSegFolder, to_square
from ddps_core.device import autocast, resolve_device, torch_threads
from ddps_core.diffusion.checkpoint import load_unet, save_unet, state_dict_hash
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion.unet import UNetModel
from ddps_core.errors import DataError
from ddps_core.io import atomic_write_text
from ddps_core.progress import CallbackReporter, Reporter
from ddps_core.training import Checkpoint, EmaTrainState, LossLog, TimeBudget, TrainingError, clear_temporaries
from ddps_core.training import content_id, read_record, run_id, warmup_cosine
from ddps_core.viz import grid, save_png

STATE_FILE = "state.pt"
WEIGHTS_FILE = "ema.safetensors"
INFO_FILE = "model.json"
LOSS_FILE = "loss.csv"
SAMPLES_FILE = "samples.png"

# Settings that change what is being trained: a state saved under other values is not resumed.
_IDENTITY_FIELDS = ("preset", "schedule", "num_timesteps", "batch_size", "lr", "warmup_steps",
                    "weight_decay", "ema_rate", "grad_clip", "hflip")


@dataclass
class StepInfo:
    """What :func:`run_stage`'s ``on_step`` receives after each logged step."""

    step: int
    total: int
    loss: float
    mse: float
    vb: float
    lr: float
    # not measured per step: the trainer's files and reports hold no timing (the summary
    # :func:`train_ddpm` returns has the run's images/s)
    images_per_s: float = math.nan


# --------------------------------------------------------------------------- data
def load_training_images(root: str | Path, image_size: int,
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """All images of ``root/unlabeled`` and ``root/real/train`` as ``uint8 [N, 3, S, S]``.

    Non-square images are resized on the short side and centre-cropped (datasets.to_square).
    Held in memory as uint8 (2000 images at 32x32 are 6 MB; 10k at 256x256 are 2 GB).
    """
    root = Path(root)
    readers = []
    if (root / "unlabeled").is_dir():
        readers.append(DDPMSegFolder(root, "unlabeled"))
    if (root / "real" / "train").is_dir():
        readers.append(DDPMSegFolder(root, "train", require_labels=False))
    if not readers:
        raise DataError(f"{root}: no training images (expected {root / 'unlabeled'} or "
                        f"{root / 'real' / 'train'})")
    total = sum(len(r) for r in readers)
    out = torch.empty((total, 3, image_size, image_size), dtype=torch.uint8)
    i = 0
    for reader in readers:
        for sample in reader:
            image, _ = to_square(sample.image, None, image_size)
            out[i] = torch.from_numpy(image).permute(2, 0, 1)
            i += 1
            if progress is not None:
                progress(i)
    return out


def _batch(images: torch.Tensor, batch_size: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """A batch drawn with replacement from ``gen`` (stateless apart from the generator), in
    [-1, 1], each image flipped left-right with probability 1/2 when ``hflip``."""
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
    x = images[idx].float().div_(127.5).sub_(1.0)
    if hflip:
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# --------------------------------------------------------------------------- helpers
def model_info(cfg: DDPMSettings, model: UNetModel, **extra: Any) -> dict[str, Any]:
    """The ``model.json`` record: enough to rebuild and identify the model."""
    config = get_preset(cfg.preset)
    return {
        "preset": cfg.preset,
        "unet": config.to_dict(),
        "schedule": cfg.schedule,
        "num_timesteps": cfg.num_timesteps,
        "image_size": config.image_size,
        "model_id": state_dict_hash(model.state_dict()),
        **extra,
    }


def sample_grid(model: UNetModel, diffusion: GaussianDiffusion, n: int, steps: int,
                method: str, seed: int, device: torch.device) -> np.ndarray:
    """``n`` samples as one uint8 grid picture (square-ish layout, upscaled small images)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode(), autocast(device):
        x = diffusion.sample(model, n, steps=steps, method=method, generator=gen, device=device)
    imgs = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    cols = int(math.ceil(math.sqrt(n)))
    rows = [list(imgs[r * cols:(r + 1) * cols]) for r in range(int(math.ceil(n / cols)))]
    size = imgs.shape[1]
    return grid(rows, scale=max(1, 128 // size))


# --------------------------------------------------------------------------- training
def train_ddpm(
    cfg: DDPMSettings,
    images: torch.Tensor,
    device: torch.device,
    *,
    inputs: Mapping[str, str],
    seed: int = 0,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Train (or resume training) the UNet of ``cfg.preset`` on ``images`` (uint8 NCHW).

    :param inputs: content ids of what is trained on, e.g. ``{"images": content_id([images])}``;
        part of the run identity (a checkpoint of other inputs is not resumed).
    :param report: gets ``progress("ddpm", step, steps, loss=, mse=, vb=, lr=)`` before the
        first step and every ``log_every`` steps, and the resume / start-over / budget lines.
    :return: a summary: steps (in all and this run), stopped_early, final loss, model id, and
        this run's ``wall_s`` and ``images_per_s`` (timing is only here, never in a file).
    """
    report = report or Reporter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unet_cfg = get_preset(cfg.preset)
    if images.shape[-1] != unet_cfg.image_size or images.shape[-2] != unet_cfg.image_size:
        raise DataError(f"training images are {tuple(images.shape[-2:])}, preset {cfg.preset!r} "
                        f"expects {unet_cfg.image_size}x{unet_cfg.image_size}")
    diffusion = GaussianDiffusion.from_name(cfg.schedule, cfg.num_timesteps)
    identity = run_id({**{k: getattr(cfg, k) for k in _IDENTITY_FIELDS}, "seed": seed}, inputs)
    ckpt = Checkpoint(out / STATE_FILE, identity, unit="step", report=report,
                      hint="Lower ddpm.lr or check the images.")
    clear_temporaries(out / WEIGHTS_FILE, out / LOSS_FILE, out / INFO_FILE)

    torch.manual_seed(seed)
    ts = EmaTrainState(unet_cfg.build(), lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed)
    log = LossLog(("step", "loss", "mse", "vb", "lr"))
    step = 0
    if (state := ckpt.resume()) is not None:
        ts.load_state_dict(state)
        log.restore(state["log"])
        step = ckpt.at
    ts.to(device)
    gen = ts.gen
    forward = torch.compile(ts.model) if cfg.compile else ts.model

    def checkpoint() -> None:
        ckpt.save(step, {**ts.state_dict(), "log": log.state()}, ts.model, ts.ema)
        save_unet(ts.ema, out / WEIGHTS_FILE)
        log.write(out / LOSS_FILE)

    budget = TimeBudget(cfg.time_budget_s, report)
    start_step, stopped_early = step, False
    report.progress("ddpm", step, cfg.steps)
    while step < cfg.steps:
        lr = warmup_cosine(step, lr=cfg.lr, total=cfg.steps, warmup=cfg.warmup_steps)
        x0 = _batch(images, cfg.batch_size, cfg.hflip, gen).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        with autocast(device):
            terms = diffusion.training_losses(forward, x0, t, noise)
        loss = terms["loss"].float().mean()
        value = ckpt.check_loss(loss, step + 1)
        ts.step(loss, step, lr=lr, grad_clip=cfg.grad_clip, ema_rate=cfg.ema_rate)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            mse, vb = terms["mse"].float().mean().item(), terms["vb"].float().mean().item()
            log.add(step, value, mse, vb, lr)
            report.progress("ddpm", step, cfg.steps, loss=value, mse=mse, vb=vb, lr=lr)
        if step % cfg.checkpoint_every == 0:
            checkpoint()
        if budget.reached(f"step {step}"):
            stopped_early = True
            break
    checkpoint()
    info = model_info(cfg, ts.ema, source="trained", seed=seed, n_images=int(images.shape[0]),
                      inputs=dict(inputs), steps=step, stopped_early=stopped_early,
                      final_loss=log.last("loss"))
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    wall, done = budget.elapsed, step - start_step
    return {"steps": step, "steps_this_run": done, "stopped_early": stopped_early,
            "final_loss": info["final_loss"], "model_id": info["model_id"], "wall_s": wall,
            "images_per_s": done * cfg.batch_size / wall if done else None}


def use_checkpoint(cfg: DDPMSettings) -> dict[str, Any]:
    """``ddpm.checkpoint`` set: validate it (strict load) and record it in ``model.json``."""
    if cfg.checkpoint is None:
        raise ValueError("use_checkpoint needs ddpm.checkpoint")
    model = load_unet(cfg.checkpoint, preset=cfg.preset)
    info = model_info(cfg, model, source="checkpoint", checkpoint=str(Path(cfg.checkpoint).resolve()))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    return info


def load_trained(out: str | Path, device: torch.device | str = "cpu") -> tuple[UNetModel, dict[str, Any]]:
    """The model a ``train_ddpm`` stage produced (trained EMA weights or the user checkpoint)."""
    out = Path(out)
    info = read_record(out / INFO_FILE, "no diffusion model here; run the train_ddpm stage (`ddps ddpm train`) first")
    path = info.get("checkpoint") or out / WEIGHTS_FILE
    model = load_unet(path, preset=info["preset"])
    return model.to(device).eval(), info


def write_samples(cfg: DDPMSettings, model: UNetModel, device: torch.device, seed: int = 0) -> Path | None:
    """Write ``samples.png`` (``cfg.sample_count`` samples); returns its path."""
    if cfg.sample_count == 0:
        return None
    diffusion = GaussianDiffusion.from_name(cfg.schedule, cfg.num_timesteps)
    picture = sample_grid(model.to(device).eval(), diffusion, cfg.sample_count, cfg.sample_steps,
                          cfg.sample_method, seed, device)
    path = Path(cfg.out) / SAMPLES_FILE
    save_png(picture, path)
    return path



def run_stage(settings: Settings, on_step: Callable[[StepInfo], None] | None = None,
              log: Callable[[str], None] | None = None,
              on_load: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The ``train_ddpm`` stage: use ``ddpm.checkpoint`` as is, or train on ``data.out``."""
    cfg = settings.ddpm
    if cfg.checkpoint:
        return use_checkpoint(cfg)
    device = resolve_device(settings.device)
    with torch_threads(cfg.threads):
        images = load_training_images(settings.data.out, get_preset(cfg.preset).image_size, on_load)
        summary = train_ddpm(cfg, images, device, seed=settings.seed, inputs={"images": content_id([images])},
                             report=CallbackReporter(_step_callback(on_step), log))
        model, _ = load_trained(cfg.out, device)
        samples = write_samples(cfg, model, device, seed=settings.seed)
    summary["samples"] = str(samples) if samples else None
    return summary

def _step_callback(on_step: Callable[[StepInfo], None] | None) -> Callable[..., None] | None:
    """``on_step`` as a reporter's progress function (called for the steps with a loss)."""
    if on_step is None:
        return None
    return lambda _task, step, total, **v: on_step(StepInfo(step, total, **v)) if "loss" in v else None


__all__ = [
    "StepInfo", "TrainingError", "load_trained", "load_training_images", "model_info",
    "run_stage", "sample_grid", "train_ddpm", "use_checkpoint", "write_samples",
]
