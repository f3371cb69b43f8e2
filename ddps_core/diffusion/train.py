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
    samples.png       a grid of samples from the EMA weights (written by the stage)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddps_core.config import DDPMSettings
from ddps_core.device import autocast
from ddps_core.diffusion.checkpoint import save_unet, state_dict_hash
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion.unet import UNetModel
from ddps_core.errors import DataError
from ddps_core.io import atomic_write_text
from ddps_core.progress import Reporter
from ddps_core.training import Checkpoint, EmaTrainState, LossLog, TimeBudget, TrainingError, clear_temporaries
from ddps_core.training import run_id, warmup_cosine

STATE_FILE = "state.pt"
WEIGHTS_FILE = "ema.safetensors"
INFO_FILE = "model.json"
LOSS_FILE = "loss.csv"
SAMPLES_FILE = "samples.png"

# Settings that change what is being trained: a state saved under other values is not resumed.
_IDENTITY_FIELDS = ("preset", "schedule", "num_timesteps", "batch_size", "lr", "warmup_steps",
                    "weight_decay", "ema_rate", "grad_clip", "hflip", "t_focus", "t_focus_below")


# --------------------------------------------------------------------------- data

def _batch(images: torch.Tensor, batch_size: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """A batch drawn with replacement from ``gen`` (stateless apart from the generator), in
    [-1, 1], each image flipped left-right with probability 1/2 when ``hflip``."""
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
    x = images[idx].float().div_(127.5).sub_(1.0)
    if hflip:
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def draw_timesteps(n: int, num_timesteps: int, gen: torch.Generator, focus: float = 0.0,
                   below: int = 200) -> torch.Tensor:
    """``n`` training timesteps: uniform over the schedule, except a ``focus`` share drawn
    uniformly from ``0 .. below - 1`` (the small steps DDPM-Seg's features come from). With
    ``focus`` 0 nothing else is drawn, so the random stream is the plain uniform one."""
    t = torch.randint(0, num_timesteps, (n,), generator=gen)
    if focus > 0:
        small = torch.randint(0, min(below, num_timesteps), (n,), generator=gen)
        t = torch.where(torch.rand(n, generator=gen) < focus, small, t)
    return t


def focus_weights(t: torch.Tensor, num_timesteps: int, focus: float, below: int = 200) -> torch.Tensor:
    """Importance weights ``1 / (T p(t))`` of timesteps drawn by :func:`draw_timesteps`, with
    ``p(t) = (1 - focus) / T + focus / B`` below ``B = min(below, T)`` and ``(1 - focus) / T``
    above: weighted by them, the mixture's loss has the uniform draw's expectation."""
    bound = min(below, num_timesteps)
    density = torch.full(t.shape, 1.0 - focus, dtype=torch.float64)  # T p(t) above the bound
    density[t.cpu() < bound] += focus * num_timesteps / bound
    return (1.0 / density).to(torch.float32)


def min_snr_weights(alphas_cumprod: np.ndarray, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of the noise MSE at timesteps ``t``: ``min(SNR_t, gamma) / SNR_t``
    with ``SNR_t = abar_t / (1 - abar_t)``; 1 where the SNR is at most ``gamma``."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[t.cpu()]
    snr = abar / (1.0 - abar)
    return (snr.clamp(max=gamma) / snr).to(torch.float32)


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
    settings = {**{k: getattr(cfg, k) for k in _IDENTITY_FIELDS}, "seed": seed}
    if cfg.min_snr_gamma is not None:  # only when set: unweighted runs keep their identity
        settings["min_snr_gamma"] = cfg.min_snr_gamma
    importance = cfg.t_focus > 0 and cfg.t_focus_mode == "importance"
    if importance:  # likewise
        settings["t_focus_mode"] = cfg.t_focus_mode
    identity = run_id(settings, inputs)
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
        t = draw_timesteps(cfg.batch_size, diffusion.num_timesteps, gen, cfg.t_focus, cfg.t_focus_below).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        with autocast(device):
            terms = diffusion.training_losses(forward, x0, t, noise)
        if cfg.min_snr_gamma is None:
            per_sample = terms["loss"].float()
        else:
            w = min_snr_weights(diffusion.alphas_cumprod, t, cfg.min_snr_gamma).to(device)
            per_sample = w * terms["mse"].float() + terms["vb"].float()
        if importance:
            per_sample = per_sample * focus_weights(t, diffusion.num_timesteps, cfg.t_focus, cfg.t_focus_below).to(device)
        loss = per_sample.mean()
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







__all__ = ["TrainingError", "draw_timesteps", "model_info", "train_ddpm"]
