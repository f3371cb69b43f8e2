"""Training the DDPS denoiser with Diffusion-on-First-Prediction (docs/method.md).

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

``feature_drop`` (ours; the reference never drops features): that share of the training
images have their features zeroed for the training forward (after the first prediction, which
always sees them), as classifier-free guidance trains its unconditional branch. Guidance
subtracts the denoiser's prediction with the features zeroed; without this that branch is
never trained.

Optimisation: AdamW, linear warm-up then cosine decay to 10% (as the DDPM trainer), gradient
clipping, an EMA of the weights whose decay ramps with the step count
(``min(ema_rate, (1 + step) / (10 + step))``); the EMA weights are what later stages use. The
loop's pieces are :mod:`ddps_core.training`'s.

Data: ``data`` yields ``(images float [B, 3, H, W] in the base's normalisation, labels long
[B, H, W])``. It is read epoch after epoch: an object with ``set_epoch`` gets it called, a
callable is called as ``data(epoch)``, any other iterable is re-iterated (so it must be
re-iterable: a list or a DataLoader, not a generator object). For a bit-identical
resume the batches of an epoch must be a function of the epoch (:func:`epoch_batches` builds
such a factory over a dataset); a DataLoader with ``shuffle=True`` and no per-epoch seed is not.

Resume: a checkpoint (weights, EMA, optimiser, step, epoch and position in it, the generator
and the global torch RNG states, the loss log) is written atomically every
``checkpoint_every`` steps and at the end; a run with the same identity (the settings that
change what is trained, ``_IDENTITY_FIELDS``, the denoiser's config, the seed, and the content
ids of the inputs the caller passes) resumes from it and ends with the same weights as an
uninterrupted one (on CPU; cuDNN kernels may differ). Any other run starts over.

Output folder (``cfg.out``); identical runs write identical files (no timing in any)::

    model.json        denoiser config, schedule, x0_source, inputs, steps, model id (EMA weights hash)
    ema.safetensors   the EMA weights: what refinement uses
    state.pt          resume state
    loss.csv          step, stage, loss, lr (one row per ``log_every`` steps)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ddps_core.device import autocast
from ddps_core.diffusion.checkpoint import load_state_dict, save_unet, state_dict_hash
from ddps_core.errors import CheckpointError, ConfigError, DataError
from ddps_core.io import atomic_write_text
from ddps_core.progress import Reporter
from ddps_core.refiner.base import SegmentationBase, freeze
from ddps_core.refiner.denoiser import DenoiserConfig, MaskDenoiser, denoiser_preset
from ddps_core.refiner.multinomial import MultinomialDiffusion, uniform_mask
from ddps_core.training import Checkpoint, EmaTrainState, LossLog, TimeBudget, TrainingError, clear_temporaries
from ddps_core.training import epoch_data, read_record, run_id, warmup_cosine

__all__ = [
    "DDPSTrainConfig",
    "TrainingError",
    "downsample_labels",
    "drop_features",
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
    feature_drop: float = 0.0
    train_guidance: float = 0.0
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
                    "num_timesteps", "schedule", "x0_source", "single_step_steps", "feature_drop", "train_guidance",
                    "lr", "warmup_steps", "weight_decay", "ema_rate", "grad_clip", "ignore_index")


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
def first_prediction(model: MaskDenoiser, features: torch.Tensor, noise_mask: torch.Tensor,
                     guidance: float = 0.0) -> torch.Tensor:
    """The denoiser's own argmax at t = 0 from the uniformly random ``noise_mask``, no gradient,
    guided with w = ``guidance`` as refinement guides its step 0 (0: unguided, the reference).

    Evaluated in eval mode (no dropout): the first prediction is what inference would produce.
    """
    from ddps_core.refiner.sample import guided_logits

    was_training = model.training
    model.eval()
    try:
        t0 = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        with autocast(features.device):
            logits = guided_logits(model, noise_mask, t0, features, guidance)
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
    guidance: float = 0.0,
) -> torch.Tensor:
    """The noisy mask x_t ``[B, h, w]`` for network steps ``t [B]`` (see the module doc);
    ``guidance``: w of the first prediction."""
    b, _, h, w = features.shape
    device = features.device
    x_t = uniform_mask((b, h, w), schedule.num_classes, generator, device)
    need = t != 0
    if not bool(need.any()):
        return x_t
    idx = need.nonzero(as_tuple=True)[0]
    if x0_source == "first_prediction":
        x0 = first_prediction(model, features[idx], x_t[idx], guidance)
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


def drop_features(features: torch.Tensor, share: float, generator: torch.Generator | None) -> torch.Tensor:
    """``features [B, C, h, w]`` with each image's zeroed with probability ``share`` (one draw
    per image from the CPU ``generator``); with ``share`` 0 nothing is drawn, so the random
    stream of a run without dropping is unchanged."""
    if share <= 0:
        return features
    drop = (torch.rand(features.shape[0], generator=generator) < share).to(features.device)
    return torch.where(drop[:, None, None, None], torch.zeros_like(features), features)


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


def _peek_channels(base: SegmentationBase, data: Any, device: torch.device) -> int:
    images, _ = next(epoch_data(data, 0))
    with torch.no_grad():
        return int(base.decoder_features(images[:1].to(device)).shape[1])


# --------------------------------------------------------------------------- training
def train_denoiser(
    cfg: Any,
    base: SegmentationBase,
    data: Any,
    *,
    num_classes: int,
    inputs: Mapping[str, str],
    device: torch.device | str = "cpu",
    feature_channels: int | None = None,
    seed: int = 0,
    report: Reporter | None = None,
    task: str = "refiner",
) -> dict[str, Any]:
    """Train (or resume) the denoiser of ``cfg`` on a frozen ``base`` over ``data``.

    :param cfg: a :class:`DDPSTrainConfig` or any object with its fields.
    :param base: frozen in place (:func:`~ddps_core.refiner.base.freeze`) and moved to ``device``.
    :param data: batches ``(images [B, 3, H, W], labels long [B, H, W])``, see the module doc.
    :param num_classes: K.
    :param inputs: content ids of the data and the base (name -> id; e.g. their hashes and the
        batching): part of the run identity, recorded in ``model.json``.
    :param feature_channels: C of ``base.decoder_features``; probed on the first batch if None.
    :param seed: seeds the initialisation and every random draw of training.
    :param report: gets ``progress(task, step, steps, loss=, lr=)`` before the first step and
        every ``log_every`` steps (an exception from it stops training; the last checkpoint
        stays), and the resume / start-over / budget lines.
    :param task: the name progress is reported under (a stage training two denoisers names each).
    :return: a summary (steps, final loss, model id, stopped_early, and this run's ``wall_s``
        and ``images_per_s``: timing is only here, never in a file).
    """
    report = report or Reporter()
    device = torch.device(device)
    if cfg.single_step_steps >= cfg.steps:
        report.log(f"single_step_steps ({cfg.single_step_steps}) >= steps ({cfg.steps}): no DFP stage")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = freeze(base).to(device)
    if feature_channels is None:
        feature_channels = _peek_channels(base, data, device)
    config = build_config(cfg, num_classes, feature_channels)
    schedule = MultinomialDiffusion(num_classes, cfg.num_timesteps, cfg.schedule)
    settings = {k: getattr(cfg, k) for k in _IDENTITY_FIELDS}
    ckpt = Checkpoint(out / STATE_FILE, run_id({**settings, "denoiser": config.to_dict(), "seed": seed}, inputs),
                      unit="step", report=report, hint="Lower refiner.lr or check the labels.")
    clear_temporaries(out / WEIGHTS_FILE, out / LOSS_FILE, out / INFO_FILE)

    torch.manual_seed(seed)
    ts = EmaTrainState(config.build(), lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed)
    log = LossLog(("step", "stage", "loss", "lr"))
    step, epoch, batch_in_epoch = 0, 0, 0
    if (state := ckpt.resume()) is not None:
        ts.load_state_dict(state)
        log.restore(state["log"])
        step, epoch, batch_in_epoch = ckpt.at, int(state["epoch"]), int(state["batch_in_epoch"])
    ts.to(device)
    model, gen = ts.model, ts.gen

    def checkpoint() -> None:
        ckpt.save(step, {**ts.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "log": log.state()},
                  ts.model, ts.ema)
        save_unet(ts.ema, out / WEIGHTS_FILE)
        log.write(out / LOSS_FILE)

    budget = TimeBudget(cfg.time_budget_s, report)
    start_step, n_images, stopped_early = step, 0, False
    T = schedule.num_timesteps
    report.progress(task, step, cfg.steps)
    while step < cfg.steps and not stopped_early:
        got_batch = False
        for bi, (images, labels) in enumerate(epoch_data(data, epoch)):
            if bi < batch_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            got_batch = True
            batch_in_epoch = bi + 1
            lr = warmup_cosine(step, lr=cfg.lr, total=cfg.steps, warmup=cfg.warmup_steps)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, torch.long, non_blocking=True)
            if labels.dim() != 3 or images.shape[0] != labels.shape[0]:
                raise DataError(f"batch {bi} of epoch {epoch}: images {tuple(images.shape)} and labels "
                                f"{tuple(labels.shape)} do not match ([B, 3, H, W] and [B, H, W])")
            with torch.no_grad(), autocast(device):
                feats = base.decoder_features(images)
            feats = feats.float()
            b = feats.shape[0]
            single = step < cfg.single_step_steps  # the single-step pre-stage: t = 0 only
            if single:
                t = torch.zeros(b, dtype=torch.long)
            else:
                t = torch.randint(0, T, (b,), generator=gen)
            t = t.to(device)
            x_t = make_training_input(model, schedule, feats, labels, t, gen, cfg.x0_source, cfg.ignore_index,
                                      cfg.train_guidance)
            feats = drop_features(feats, cfg.feature_drop, gen)
            with autocast(device):
                logits = model(x_t, t, feats)
            loss = masked_cross_entropy(logits, labels, cfg.ignore_index)
            value = ckpt.check_loss(loss, step + 1)
            ts.step(loss, step, lr=lr, grad_clip=cfg.grad_clip, ema_rate=cfg.ema_rate)
            step += 1
            n_images += b
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.add(step, "single_step" if single else "dfp", value, lr)
                report.progress(task, step, cfg.steps, loss=value, lr=lr)
            if step % cfg.checkpoint_every == 0:
                checkpoint()
            stopped_early = budget.reached(f"step {step}")
            if step >= cfg.steps or stopped_early:
                break
        else:
            if not got_batch and batch_in_epoch == 0:
                raise DataError("the DDPS training data yielded no batch")
            epoch, batch_in_epoch = epoch + 1, 0
    checkpoint()
    info = {
        "denoiser": config.to_dict(),
        "schedule": schedule.to_dict(),
        "x0_source": cfg.x0_source,
        # the settings, not where they were written: the folder may move (a DVC cache)
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in _cfg_dict(cfg).items() if k != "out"},
        "seed": seed, "inputs": dict(inputs), "steps": step, "stopped_early": stopped_early,
        "final_loss": log.last("loss"),
        "model_id": state_dict_hash(ts.ema.state_dict()),
    }
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2, default=str))
    wall, done = budget.elapsed, step - start_step
    return {"steps": step, "steps_this_run": done, "stopped_early": stopped_early,
            "final_loss": info["final_loss"], "model_id": info["model_id"], "wall_s": wall,
            "images_per_s": n_images / wall if done else None}


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    return asdict(cfg)


def load_denoiser(out: str | Path, device: torch.device | str = "cpu") -> tuple[MaskDenoiser, MultinomialDiffusion, dict]:
    """The EMA denoiser, its schedule and ``model.json`` of a finished :func:`train_denoiser`."""
    out = Path(out)
    info = read_record(out / INFO_FILE, "no DDPS denoiser here; run the train_refiner stage (`ddps refiner train`) "
                       "first", rerun="train_refiner")
    try:
        config = DenoiserConfig.from_dict(info["denoiser"])
    except TypeError as exc:  # a field missing from, or foreign to, the recorded config
        raise DataError(f"{out / INFO_FILE}: incomplete record: its 'denoiser' entry does not describe a "
                        f"denoiser ({exc}); rerun the train_refiner stage to write it again") from None
    model = config.build()
    sd = load_state_dict(out / WEIGHTS_FILE)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{out / WEIGHTS_FILE}: does not fit the denoiser of {out / INFO_FILE} ({exc})") from None
    sch = info["schedule"]
    schedule = MultinomialDiffusion(sch["num_classes"], sch["num_timesteps"], sch["schedule"], sch["a1"], sch["aT"])
    return model.to(device).eval(), schedule, info
