"""Training the DDPS denoiser with Diffusion-on-First-Prediction (METHODS.md §6).

Per image of a batch a network step t is drawn uniformly from 0..T-1 (t = 0 noisiest):

- t = 0: the input is a uniformly random mask (pure noise);
- t != 0: the denoiser itself, without gradient, predicts x_0 from F and a uniformly random
  mask at t = 0; its argmax ``x0_hat`` (the *first prediction*) is noised to t through the
  marginal ``q(x_s | x0_hat)`` with ``s = T - 1 - t``.

Why the first prediction and not the ground truth: at inference the re-noised masks come from
the model's own argmax, with the model's own kind of errors; training on noised ground truth
teaches the denoiser to fix random label flips, which are not the errors it will meet. The
ablation ``x0_source="gt"`` noises the ground truth instead (downsampled by nearest to the
feature size h x w; ignore pixels there take the uniformly random mask's class, i.e. they are
pure noise) so the report can show what the first prediction buys.

One uniformly random mask is drawn per image every step; it is the t = 0 input of images with
t = 0 and the input of the first prediction of the others, so the random stream does not
depend on which t were drawn.

Loss: the denoiser predicts x_0 logits at the feature resolution (stride 4); they are upsampled
bilinearly (``align_corners=False``) to the label size and scored with cross-entropy against
the full-resolution ground truth, ignore pixels excluded, averaged over the valid pixels of the
batch. Scoring at full resolution (instead of against a downsampled label) is the choice made
here: the evaluation is at full resolution, and thin parts (brows, eyes) that a nearest
downsampling would drop still contribute. No KL term (the reference trains with CE only).

``single_step_steps``: the first optimiser steps use t = 0 only (the reference's single-step
pre-stage): the denoiser first learns to segment from F alone, so that its first prediction is
worth noising when Diffusion-on-First-Prediction starts. Both stages are one run with one
learning-rate schedule and one EMA.

Optimisation: AdamW, linear warm-up then cosine decay to 10% (as the DDPM trainer), gradient
clipping, an EMA of the weights whose decay ramps with the step count
(``min(ema_rate, (1 + step) / (10 + step))``); the EMA weights are what later stages use.

Data: ``data`` yields ``(images float [B, 3, H, W] in the base's normalisation, labels long
[B, H, W])``. It is read epoch after epoch: an object with ``set_epoch`` gets it called, a
callable is called as ``data(epoch)``, any other iterable is re-iterated (so it must be
re-iterable: a list or a DataLoader, not a generator object). For a bit-identical
resume the batches of an epoch must be a function of the epoch (:func:`epoch_batches` builds
such a factory over a dataset); a DataLoader with ``shuffle=True`` and no per-epoch seed is not.

Resume: a checkpoint (weights, EMA, optimiser, step, epoch and position in it, the generator
and the global torch RNG states, the loss history) is written atomically every
``checkpoint_every`` steps and at the end; a run with the same settings resumes from it and
ends with the same weights as an uninterrupted one (on CPU; cuDNN kernels may differ).

Output folder (``cfg.out``)::

    model.json        denoiser config, schedule, x0_source, steps, model id (EMA weights hash)
    ema.safetensors   the EMA weights: what refinement uses
    state.pt          resume state
    loss.csv          step, stage, loss, lr, images/s (one row per ``log_every`` steps)
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ddps_core.device import autocast, nonfinite_tensors
from ddps_core.diffusion.checkpoint import load_state_dict, save_unet, state_dict_hash
from ddps_core.errors import CheckpointError, ConfigError, DataError, DDPSError
from ddps_core.io import atomic_write_bytes, atomic_write_text
from ddps_core.refiner.base import SegmentationBase, freeze
from ddps_core.refiner.denoiser import DenoiserConfig, MaskDenoiser, denoiser_preset
from ddps_core.refiner.multinomial import MultinomialDiffusion, uniform_mask

__all__ = [
    "DDPSTrainConfig",
    "RefineTrainingError",
    "StepInfo",
    "downsample_labels",
    "epoch_batches",
    "first_prediction",
    "load_denoiser",
    "make_training_input",
    "train_denoiser",
]

STATE_FILE = "state.pt"
WEIGHTS_FILE = "ema.safetensors"
INFO_FILE = "model.json"
LOSS_FILE = "loss.csv"

X0Source = Literal["first_prediction", "gt"]


class RefineTrainingError(DDPSError):
    """Denoiser training cannot go on (non-finite loss); the last good checkpoint is kept."""


@dataclass
class DDPSTrainConfig:
    """The knobs of :func:`train_denoiser`. The function only reads these attributes, so a
    pydantic settings section with the same field names can be passed as is.

    ``width`` / ``channel_mult`` / ``num_res_blocks`` override the preset's when set.
    """

    out: str = "data/models/ddps"
    preset: str = "tiny"
    width: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    embed_dim: int = 16
    dropout: float = 0.0
    num_timesteps: int = 20
    schedule: Literal["linear", "cosine"] = "linear"
    x0_source: X0Source = "first_prediction"
    steps: int = 2000
    single_step_steps: int = 400
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    ema_rate: float = 0.999
    grad_clip: float | None = 1.0
    checkpoint_every: int = 250
    log_every: int = 10
    time_budget_s: float | None = None
    ignore_index: int = 255


# Settings that change what is trained: a state saved under other values is not resumed.
_IDENTITY_FIELDS = ("preset", "width", "channel_mult", "num_res_blocks", "embed_dim", "dropout",
                    "num_timesteps", "schedule", "x0_source", "single_step_steps", "lr",
                    "warmup_steps", "weight_decay", "ema_rate", "grad_clip", "ignore_index")


@dataclass
class StepInfo:
    """What a progress callback receives after each logged step."""

    step: int
    total: int
    stage: str  # "single_step" or "dfp"
    loss: float
    lr: float
    images_per_s: float


# --------------------------------------------------------------------------- building blocks
def build_config(cfg: Any, num_classes: int, feature_channels: int) -> DenoiserConfig:
    """The :class:`DenoiserConfig` a training config describes."""
    return denoiser_preset(cfg.preset, num_classes, feature_channels, width=cfg.width,
                           channel_mult=tuple(cfg.channel_mult) if cfg.channel_mult else None,
                           num_res_blocks=cfg.num_res_blocks, embed_dim=cfg.embed_dim,
                           dropout=cfg.dropout)


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels ``[B, H, W]`` -> ``[B, h, w]`` by nearest neighbour (a label is never averaged)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


@torch.no_grad()
def first_prediction(model: MaskDenoiser, features: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
    """The denoiser's own argmax at t = 0 from the uniformly random ``noise_mask``, no gradient.

    Evaluated in eval mode (no dropout): the first prediction is what inference would produce.
    """
    was_training = model.training
    model.eval()
    try:
        t0 = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        with autocast(features.device):
            logits = model(noise_mask, t0, features)
        return logits.float().argmax(dim=1)
    finally:
        model.train(was_training)


def make_training_input(
    model: MaskDenoiser,
    schedule: MultinomialDiffusion,
    features: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator | None,
    x0_source: X0Source = "first_prediction",
    ignore_index: int = 255,
) -> torch.Tensor:
    """The noisy mask x_t ``[B, h, w]`` for network steps ``t [B]`` (see the module doc)."""
    b, _, h, w = features.shape
    device = features.device
    x_t = uniform_mask((b, h, w), schedule.num_classes, generator, device)
    need = t != 0
    if not bool(need.any()):
        return x_t
    idx = need.nonzero(as_tuple=True)[0]
    if x0_source == "first_prediction":
        x0 = first_prediction(model, features[idx], x_t[idx])
    elif x0_source == "gt":
        small = downsample_labels(labels[idx], (h, w))
        x0 = torch.where(small == ignore_index, x_t[idx], small)
        if int(x0.max()) >= schedule.num_classes or int(x0.min()) < 0:
            raise DataError(f"label values {int(x0.min())}..{int(x0.max())} outside 0..{schedule.num_classes - 1} "
                            f"(and not the ignore index {ignore_index})")
    else:
        raise ConfigError(f"refiner.x0_source: {x0_source!r} is not 'first_prediction' or 'gt'")
    x_t = x_t.clone()
    x_t[idx] = schedule.q_sample(x0, schedule.s_from_t(t[idx]), generator)
    return x_t


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of x_0 logits ``[B, K, h, w]`` upsampled (bilinear, align_corners=False)
    to the label size, averaged over the non-ignored pixels (0 when there are none)."""
    up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(up, labels, ignore_index=ignore_index, reduction="sum")
    valid = (labels != ignore_index).sum().clamp(min=1)
    return total / valid


def epoch_batches(dataset: Any, batch_size: int, seed: int = 0, shuffle: bool = True,
                  drop_last: bool = True, num_workers: int = 0, **loader_kwargs: Any) -> Callable[[int], Iterable]:
    """A factory ``epoch -> DataLoader`` whose order is a function of ``(seed, epoch)`` only,
    which is what an exact resume needs (a plain shuffling DataLoader draws its order from the
    global RNG at each ``iter``)."""
    from torch.utils.data import DataLoader

    def make(epoch: int) -> Iterable:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          generator=gen, num_workers=num_workers, **loader_kwargs)

    return make


def _epoch_iter(data: Any, epoch: int) -> Iterator:
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
        return iter(data)
    if callable(data):
        return iter(data(epoch))
    if isinstance(data, Iterable):
        return iter(data)
    raise ConfigError(f"training data must be iterable, have set_epoch, or be a callable epoch -> batches; "
                      f"got {type(data).__name__}")


def _lr_at(cfg: Any, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 10% of it at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, rate: float, step: int) -> None:
    decay = min(rate, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def _digest(cfg: Any, config: DenoiserConfig, seed: int, data_id: str) -> str:
    ident = {k: getattr(cfg, k) for k in _IDENTITY_FIELDS}
    ident["channel_mult"] = list(ident["channel_mult"]) if ident["channel_mult"] else None
    ident.update(denoiser=config.to_dict(), seed=seed, data_id=data_id)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"{path}: cannot read the DDPS training state ({exc}); delete it to start over") from None


def _write_loss_csv(path: Path, history: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "stage", "loss", "lr", "images_per_s"])
    for step, stage, loss, lr, ips in history:
        writer.writerow([int(step), stage, f"{loss:.6g}", f"{lr:.6g}", f"{ips:.6g}"])
    atomic_write_text(path, buf.getvalue())


def _peek_channels(base: SegmentationBase, data: Any, device: torch.device) -> int:
    images, _ = next(_epoch_iter(data, 0))
    with torch.no_grad():
        return int(base.decoder_features(images[:1].to(device)).shape[1])


# --------------------------------------------------------------------------- training
def train_denoiser(
    cfg: Any,
    base: SegmentationBase,
    data: Any,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    feature_channels: int | None = None,
    seed: int = 0,
    data_id: str = "",
    on_step: Callable[[StepInfo], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the denoiser of ``cfg`` on a frozen ``base`` over ``data``.

    :param cfg: a :class:`DDPSTrainConfig` or any object with its fields.
    :param base: frozen in place (:func:`~ddps_core.refiner.base.freeze`) and moved to ``device``.
    :param data: batches ``(images [B, 3, H, W], labels long [B, H, W])``, see the module doc.
    :param num_classes: K.
    :param feature_channels: C of ``base.decoder_features``; probed on the first batch if None.
    :param seed: seeds the initialisation and every random draw of training.
    :param data_id: identifies the data and base (e.g. their hashes): part of the resume key.
    :param on_step: called with a :class:`StepInfo` every ``log_every`` steps; an exception
        from it stops training (the last checkpoint stays).
    :param log: receives one-line messages (resume, time budget).
    :return: a summary (steps, final loss, images/s, wall time, model id, stopped_early).
    """
    say = log or (lambda _msg: None)
    device = torch.device(device)
    if cfg.single_step_steps >= cfg.steps:
        say(f"single_step_steps ({cfg.single_step_steps}) >= steps ({cfg.steps}): no DFP stage")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = freeze(base).to(device)
    if feature_channels is None:
        feature_channels = _peek_channels(base, data, device)
    config = build_config(cfg, num_classes, feature_channels)
    schedule = MultinomialDiffusion(num_classes, cfg.num_timesteps, cfg.schedule)
    digest = _digest(cfg, config, seed, data_id)

    torch.manual_seed(seed)
    model = config.build()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    step, epoch, batch_in_epoch, history = 0, 0, 0, []

    state_path = out / STATE_FILE
    if state_path.exists():
        state = _load_state(state_path)
        if state.get("digest") == digest:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
            history = [list(r) for r in state["history"]]
            say(f"resuming from step {step} ({state_path})")
        else:
            say(f"{state_path} was trained with other settings: starting over")

    model.to(device).train()
    ema.to(device).eval()
    for group in opt.state.values():  # optimiser state follows the model's device
        for k, v in group.items():
            if torch.is_tensor(v) and k != "step":
                group[k] = v.to(device)

    def checkpoint() -> None:
        bad = nonfinite_tensors(model, ema)
        if bad:
            raise RefineTrainingError(
                f"non-finite DDPS weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) "
                f"after step {step}; the last good checkpoint ({state_path}) is kept. Lower refiner.lr.")
        _save_state(state_path, {
            "digest": digest, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
        })
        save_unet(ema, out / WEIGHTS_FILE)
        _write_loss_csv(out / LOSS_FILE, history)

    start, start_step, n_images = time.perf_counter(), step, 0
    t_log, n_log = time.perf_counter(), 0
    stopped_early = False
    T = schedule.num_timesteps
    while step < cfg.steps and not stopped_early:
        got_batch = False
        for bi, (images, labels) in enumerate(_epoch_iter(data, epoch)):
            if bi < batch_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            got_batch = True
            batch_in_epoch = bi + 1
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, torch.long, non_blocking=True)
            if labels.dim() != 3 or images.shape[0] != labels.shape[0]:
                raise DataError(f"batch {bi} of epoch {epoch}: images {tuple(images.shape)} and labels "
                                f"{tuple(labels.shape)} do not match ([B, 3, H, W] and [B, H, W])")
            with torch.no_grad(), autocast(device):
                feats = base.decoder_features(images)
            feats = feats.float()
            b = feats.shape[0]
            single = step < cfg.single_step_steps
            if single:
                t = torch.zeros(b, dtype=torch.long)
            else:
                t = torch.randint(0, T, (b,), generator=gen)
            t = t.to(device)
            x_t = make_training_input(model, schedule, feats, labels, t, gen, cfg.x0_source, cfg.ignore_index)
            with autocast(device):
                logits = model(x_t, t, feats)
            loss = masked_cross_entropy(logits, labels, cfg.ignore_index)
            if not torch.isfinite(loss):
                raise RefineTrainingError(
                    f"non-finite DDPS loss ({loss.item()}) at step {step + 1}; the last good checkpoint "
                    f"({state_path}) is kept. Lower refiner.lr or check the labels.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            _ema_update(ema, model, cfg.ema_rate, step)
            step += 1
            n_log += b
            n_images += b
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                ips = n_log / max(now - t_log, 1e-9)
                t_log, n_log = now, 0
                row = [step, "single_step" if single else "dfp", loss.item(), lr, ips]
                history.append(row)
                if on_step is not None:
                    on_step(StepInfo(step, cfg.steps, *row[1:]))
            if step % cfg.checkpoint_every == 0:
                checkpoint()
            if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
                say(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}")
                stopped_early = True
            if step >= cfg.steps or stopped_early:
                break
        else:
            if not got_batch and batch_in_epoch == 0:
                raise DataError("the DDPS training data yielded no batch")
            epoch, batch_in_epoch = epoch + 1, 0
    checkpoint()
    wall = time.perf_counter() - start
    done = step - start_step
    info = {
        "denoiser": config.to_dict(),
        "schedule": schedule.to_dict(),
        "x0_source": cfg.x0_source,
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in _cfg_dict(cfg).items()},
        "seed": seed, "data_id": data_id, "steps": step, "stopped_early": stopped_early,
        "final_loss": history[-1][2] if history else None,
        "model_id": state_dict_hash(ema.state_dict()),
    }
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2, default=str))
    return {"steps": step, "steps_this_run": done, "stopped_early": stopped_early,
            "final_loss": info["final_loss"], "wall_s": wall, "model_id": info["model_id"],
            "images_per_s": n_images / wall if done else None}


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    return asdict(cfg)


def load_denoiser(out: str | Path, device: torch.device | str = "cpu") -> tuple[MaskDenoiser, MultinomialDiffusion, dict]:
    """The EMA denoiser, its schedule and ``model.json`` of a finished :func:`train_denoiser`."""
    out = Path(out)
    try:
        info = json.loads((out / INFO_FILE).read_text())
    except FileNotFoundError:
        raise DataError(f"{out / INFO_FILE}: no DDPS denoiser here; run the train_ddps stage "
                        "(`ddps ddps train`) first") from None
    config = DenoiserConfig.from_dict(info["denoiser"])
    model = config.build()
    sd = load_state_dict(out / WEIGHTS_FILE)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{out / WEIGHTS_FILE}: does not fit the denoiser of {out / INFO_FILE} ({exc})") from None
    sch = info["schedule"]
    schedule = MultinomialDiffusion(sch["num_classes"], sch["num_timesteps"], sch["schedule"], sch["a1"], sch["aT"])
    return model.to(device).eval(), schedule, info
