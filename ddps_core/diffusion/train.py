"""DDPM training on a folder of unlabelled images.

AdamW with linear warm-up, an EMA of the weights whose decay ramps up with the step count
(``min(ema_rate, (1 + step) / (10 + step))``, so a short run's EMA is not still the random
initialisation), random horizontal flips, gradient clipping, and the hybrid loss (simple eps
MSE + the VLB term for the learned variance).

Everything random comes from one seeded :class:`torch.Generator` whose state is checkpointed,
so a run resumed from its last checkpoint ends with the same weights as an uninterrupted one
(on CPU). Checkpoints are written atomically every ``checkpoint_every`` steps and at the end.

Output folder (``DDPMSettings.out``)::

    model.json        what was trained: preset, UNet flags, schedule, model id (weights hash)
    ema.safetensors   the EMA weights: the model every later stage uses
    state.pt          resume state: weights, EMA, optimiser, step, RNG states, loss history
    loss.csv          step, loss, mse, vb, lr, images/s (one row per ``log_every`` steps)
    samples.png       a grid of samples from the EMA weights (DDIM by default)
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddps_core.config import DDPMSettings
from ddps_core.device import autocast, nonfinite_tensors
from ddps_core.diffusion.checkpoint import save_unet, state_dict_hash
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion.unet import UNetModel
from ddps_core.errors import CheckpointError, DDPSError, DataError
from ddps_core.io import atomic_write_bytes, atomic_write_text

STATE_FILE = "state.pt"
WEIGHTS_FILE = "ema.safetensors"
INFO_FILE = "model.json"
LOSS_FILE = "loss.csv"
SAMPLES_FILE = "samples.png"

# Settings that change what is being trained: a state saved under other values is not resumed.
_IDENTITY_FIELDS = ("preset", "schedule", "num_timesteps", "batch_size", "lr", "warmup_steps",
                    "weight_decay", "ema_rate", "grad_clip", "hflip")


class TrainingError(DDPSError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass
class StepInfo:
    """What a progress callback receives after each logged step."""

    step: int
    total: int
    loss: float
    mse: float
    vb: float
    lr: float
    images_per_s: float


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


# --------------------------------------------------------------------------- helpers
def settings_digest(cfg: DDPMSettings, n_images: int, seed: int) -> str:
    """A short hash of what defines a training run (not its length or logging)."""
    ident = {k: getattr(cfg, k) for k in _IDENTITY_FIELDS}
    ident.update(n_images=n_images, seed=seed)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _lr_at(cfg: DDPMSettings, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 10% of it at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float, step: int) -> None:
    decay = min(rate, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"{path}: cannot read the training state ({exc}); delete it to "
                              "start over") from None


def _write_loss_csv(path: Path, history: list[list[float]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "mse", "vb", "lr", "images_per_s"])
    for row in history:
        writer.writerow([int(row[0]), *(f"{v:.6g}" for v in row[1:])])
    atomic_write_text(path, buf.getvalue())


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
    seed: int = 0,
    on_step: Callable[[StepInfo], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) the UNet of ``cfg.preset`` on ``images`` (uint8 NCHW).

    Returns a summary (steps done, final loss, images/s, wall time, model id).
    """
    say = log or (lambda _msg: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unet_cfg = get_preset(cfg.preset)
    if images.shape[-1] != unet_cfg.image_size or images.shape[-2] != unet_cfg.image_size:
        raise DataError(f"training images are {tuple(images.shape[-2:])}, preset {cfg.preset!r} "
                        f"expects {unet_cfg.image_size}x{unet_cfg.image_size}")
    diffusion = GaussianDiffusion.from_name(cfg.schedule, cfg.num_timesteps)
    digest = settings_digest(cfg, images.shape[0], seed)

    torch.manual_seed(seed)
    model = unet_cfg.build()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    step, history = 0, []

    state_path = out / STATE_FILE
    if state_path.exists():
        state = _load_state(state_path)
        if state.get("digest") == digest:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            step, history = int(state["step"]), [list(r) for r in state["history"]]
            say(f"resuming from step {step} ({state_path})")
        else:
            say(f"{state_path} was trained with other settings: starting over")

    model.to(device).train()
    ema.to(device).eval()
    for group in opt.state.values():  # optimiser state follows the model's device
        for k, v in group.items():
            if torch.is_tensor(v) and k != "step":
                group[k] = v.to(device)
    forward = torch.compile(model) if cfg.compile else model

    def checkpoint() -> None:
        bad = nonfinite_tensors(model, ema)
        if bad:
            raise TrainingError(
                f"non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) after "
                f"step {step}; the last good checkpoint ({state_path}, step "
                f"{_saved_step(state_path)}) is kept. Lower ddpm.lr or check the images.")
        _save_state(state_path, {
            "digest": digest, "step": step, "model": model.state_dict(),
            "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "history": history,
        })
        save_unet(ema, out / WEIGHTS_FILE)
        _write_loss_csv(out / LOSS_FILE, history)

    start, start_step, t_log, n_log = time.perf_counter(), step, time.perf_counter(), 0
    stopped_early = False
    while step < cfg.steps:
        lr = _lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = _batch(images, cfg.batch_size, cfg.hflip, gen).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        with autocast(device):
            terms = diffusion.training_losses(forward, x0, t, noise)
        loss = terms["loss"].float().mean()
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at step {step + 1}; the last good checkpoint "
                f"({state_path}, step {_saved_step(state_path)}) is kept. Lower ddpm.lr or check "
                "the images.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, model, cfg.ema_rate, step)
        step += 1
        n_log += cfg.batch_size
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            ips = n_log / max(now - t_log, 1e-9)
            t_log, n_log = now, 0
            row = [step, loss.item(), terms["mse"].float().mean().item(),
                   terms["vb"].float().mean().item(), lr, ips]
            history.append(row)
            if on_step is not None:
                on_step(StepInfo(step, cfg.steps, *row[1:]))
        if step % cfg.checkpoint_every == 0:
            checkpoint()
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            say(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}")
            stopped_early = True
            break
    checkpoint()
    wall = time.perf_counter() - start
    done = step - start_step
    summary = {
        "steps": step, "steps_this_run": done, "stopped_early": stopped_early,
        "final_loss": history[-1][1] if history else None,
        "images_per_s": done * cfg.batch_size / wall if done else None,
        "wall_s": wall,
    }
    info = model_info(cfg, ema, source="trained", seed=seed, n_images=int(images.shape[0]),
                      **{k: v for k, v in summary.items() if k != "steps_this_run"})
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    summary["model_id"] = info["model_id"]
    return summary


def _saved_step(state_path: Path) -> str:
    if not state_path.exists():
        return "none: no checkpoint written yet"
    try:
        return str(int(_load_state(state_path)["step"]))
    except Exception:
        return "unknown"


__all__ = ["StepInfo", "TrainingError", "model_info", "settings_digest", "train_ddpm"]
