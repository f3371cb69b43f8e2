"""Training the student on a labelled image folder, resumably.

Two kinds of training data (``student.source``):

* ``generated``: an :class:`ImageSet` of ``S x S`` entries (the export under ``data.resize``),
  with random horizontal flips and random scales (resize by ``s ~ U[scale_min, scale_max]``,
  then a random crop, or a pad with the ignore label, back to the training size): ours, the
  reference leaves it open;
* ``labelled``: :class:`~ddps_core.student.labelled.LabelledCrops`, mmsegmentation's random
  resize, crop and flip of each image at its own resolution.

Optimisation: AdamW (torch's fused kernel: the same update in one pass, measured by
``benchmarks/optimizer_fused.py``) or SGD with momentum (``optimizer``), a linear warm-up
then poly decay
``min_lr + (lr - min_lr) * (1 - p) ** poly_power``; the decoder and head at ``head_lr_mult``
times the rate, normalisation layers without weight decay unless ``norm_weight_decay``;
cross-entropy with the ignore index (``distill: hard``), or with ``distill: soft`` also the
distillation term of :func:`distill_loss` on the teacher's soft labels (:class:`SoftTargets`).
One epoch goes over the data in an order that is a
function of ``(seed, epoch)``; ``iterations``, when set, is the run's length in optimiser steps
(the last epoch stops there).

With ``ema_rate`` an exponential moving average of the weights (and the BatchNorm statistics),
updated after every optimiser step (``torch.optim.swa_utils.AveragedModel``), is what each
epoch scores, selects and saves; the trained weights only continue the training.

Checkpoint selection (the reference): after every epoch the model is scored (mIoU) on the
real labelled images and the best epoch is kept (``select_on: real``); or the last epoch
(``select_on: last``).

Resume: ``state.pt`` (weights, optimiser, epoch, best score and weights, RNG state, history)
is written atomically after every epoch; a rerun with the same identity continues with the
next epoch and ends with the same weights as an uninterrupted run (on CPU). The identity is
the settings that change what is trained (``_IDENTITY``, the classes), the content ids of the
training data the caller passes, and the content of the validation images (hashed here: they
decide the selected epoch, and are decoded for scoring anyway); any other run starts over.
The loop's pieces are :mod:`ddps_core.training`'s. Outputs in ``out``; identical runs write
identical files (no timing in any)::

    student.safetensors   the selected weights        model.json   config, selection, classes, inputs
    history.csv           epoch, loss, lr, val_miou   state.pt     resume state
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddps_core.datasets import to_square
from ddps_core.errors import DataError
from ddps_core.io import atomic_write_bytes, atomic_write_text
from ddps_core.metrics import ConfusionAccumulator
from ddps_core.progress import Reporter
from ddps_core.student.labelled import LabelledCrops
from ddps_core.student.model import INFO_FILE, WEIGHTS_FILE, Student, build_student
from ddps_core.training import Checkpoint, LossLog, TimeBudget, TrainingError, backward_step, clear_temporaries
from ddps_core.training import content_id, run_id, warmup_poly

__all__ = ["ImageSet", "SoftTargets", "TrainingError", "augment", "distill_loss", "predict_labels", "score_set",
           "train_student"]

STATE_FILE = "state.pt"
HISTORY_FILE = "history.csv"
_CACHE_BYTES = 1 << 30


class ImageSet:
    """``(image uint8 [S, S, 3], label [S, S])`` pairs of a reader, squared to ``size``.

    Decoded pairs are cached in memory up to 1 GiB in total; beyond that they are read from
    the files every time (memory stays bounded for any dataset size).
    """

    def __init__(self, reader: Any, size: int):
        self.reader, self.size = reader, int(size)
        self.ids = list(reader.ids)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_ok = len(self.ids) * self.size * self.size * 4 <= _CACHE_BYTES

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        sample = self.reader[i]
        if sample.label is None:
            raise DataError(f"{getattr(self.reader, 'folder', self.reader)}: image {sample.id!r} has no label")
        pair = to_square(sample.image, sample.label, self.size)
        if self._cache_ok:
            self._cache[i] = pair
        return pair

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """float ``[B, 3, S, S]`` in [0, 1] and long labels ``[B, S, S]``."""
        pairs = [self[int(i)] for i in indices]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(np.stack([p[1].astype(np.int64) for p in pairs]))
        return images, labels


class SoftTargets:
    """The distillation targets of an export's entries: ``float32 [K + 1, S, S]`` per entry,
    the teacher's soft labels (the members' mean softmax, ``soft/<id>.npy``) resized bilinearly
    to ``S x S``, then a weight channel: ``1 - JS / ln M`` from ``soft/<id>_uncertainty.png``
    with ``uncertainty_weight``, else 1. An entry without soft labels (a real labelled image)
    gets its label one-hot, weight 1 (0 at the ignore index).

    :param soft: entry id -> ``(probs path, uncertainty path)`` (the manifest's kept rows that
        have soft labels).
    """

    def __init__(self, soft: dict[str, tuple[Path, Path]], num_classes: int, ignore_index: int,
                 uncertainty_weight: bool = True):
        self.soft, self.k, self.ignore_index = dict(soft), int(num_classes), int(ignore_index)
        self.uncertainty_weight = bool(uncertainty_weight)
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0

    def _native(self, entry_id: str) -> torch.Tensor:
        """float32 ``[K + 1, h, w]`` at the soft labels' own size. Kept in memory up to 1 GiB in
        all; beyond that read from the files every time (the same values either way)."""
        if entry_id in self._cache:
            return self._cache[entry_id]
        from ddps_core.metrics.files import load_label_map

        probs_path, heat_path = self.soft[entry_id]
        try:
            probs = np.load(probs_path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise DataError(f"{probs_path}: cannot read soft labels ({exc}); rerun the generate stage") from None
        if probs.ndim != 3 or probs.shape[0] != self.k:
            raise DataError(f"{probs_path}: soft labels of shape {probs.shape}, expected [{self.k}, H, W]")
        weight = np.ones(probs.shape[1:], np.float32)
        if self.uncertainty_weight:
            weight = 1.0 - load_label_map(heat_path).astype(np.float32) / 255.0
        target = torch.from_numpy(np.concatenate([probs, weight[None]]))
        if self._cached_bytes + 4 * target.numel() <= _CACHE_BYTES:
            self._cache[entry_id] = target
            self._cached_bytes += 4 * target.numel()
        return target

    def batch(self, ids: Sequence[str], labels: torch.Tensor) -> torch.Tensor:
        """float ``[B, K + 1, S, S]`` for entries ``ids`` with labels ``[B, S, S]``."""
        s = labels.shape[-2:]
        out = []
        for entry_id, label in zip(ids, labels):
            if entry_id in self.soft:
                t = self._native(entry_id)[None]
                if tuple(t.shape[-2:]) != tuple(s):
                    t = F.interpolate(t, size=tuple(s), mode="bilinear", align_corners=False)
                out.append(t[0])
            else:
                valid = label != self.ignore_index
                onehot = F.one_hot(torch.where(valid, label, 0).long(), self.k).permute(2, 0, 1).float()
                out.append(torch.cat([onehot * valid, valid[None].float()]))
        return torch.stack(out)


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                 soft_weight: float = 1.0, ignore_index: int = 255) -> torch.Tensor:
    """``soft_weight * KD + (1 - soft_weight) * CE``: CE the cross-entropy on ``labels``
    (ignore index left out), KD the weighted mean over pixels of
    ``T^2 KL(p_T || q_T)``, with ``p_T`` the target probabilities softened at temperature ``T``
    (``softmax(log p / T)``), ``q_T = softmax(logits / T)`` and the pixel weights of the last
    channel of ``targets`` (``[B, K + 1, H, W]``, :class:`SoftTargets`)."""
    k = logits.shape[1]
    t = float(temperature)
    probs, weight = targets[:, :k], targets[:, k]
    log_p = torch.log_softmax(torch.log(probs.clamp_min(1e-8)) / t, dim=1)
    log_q = torch.log_softmax(logits / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    kd = t * t * (weight * kl).sum() / weight.sum().clamp_min(1e-8)
    if soft_weight >= 1.0:
        return kd
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    return soft_weight * kd + (1.0 - soft_weight) * ce


def augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, hflip: bool,
            scale_min: float, scale_max: float, ignore_index: int,
            targets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Random flip and scale per image, back to the input size (see the module doc). With
    ``targets`` (``[B, C, S, S]`` maps, e.g. :class:`SoftTargets`) they get the same flip and
    scale (bilinear) and zeros where the image is padded; returned third."""
    b, _, s, _ = images.shape
    out_i, out_l = torch.empty_like(images), torch.empty_like(labels)
    out_t = None if targets is None else torch.empty_like(targets)
    for k in range(b):
        img, lab = images[k:k + 1], labels[k:k + 1]
        tgt = None if targets is None else targets[k:k + 1]
        if hflip and torch.rand((), generator=gen) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
            tgt = None if tgt is None else tgt.flip(-1)
        scale = scale_min + (scale_max - scale_min) * float(torch.rand((), generator=gen))
        n = max(1, int(round(s * scale)))
        if n != s:
            img = F.interpolate(img, size=(n, n), mode="bilinear", align_corners=False)
            lab = F.interpolate(lab[:, None].float(), size=(n, n), mode="nearest")[:, 0].long()
            if tgt is not None:
                tgt = F.interpolate(tgt, size=(n, n), mode="bilinear", align_corners=False)
        if n >= s:
            y, x = (int(torch.randint(0, n - s + 1, (2,), generator=gen)[j]) for j in range(2))
            img, lab = img[..., y:y + s, x:x + s], lab[..., y:y + s, x:x + s]
            tgt = None if tgt is None else tgt[..., y:y + s, x:x + s]
        else:
            y, x = (int(torch.randint(0, s - n + 1, (2,), generator=gen)[j]) for j in range(2))
            canvas = torch.zeros_like(images[k:k + 1])
            canvas[..., y:y + n, x:x + n] = img
            lcanvas = torch.full_like(labels[k:k + 1], ignore_index)
            lcanvas[..., y:y + n, x:x + n] = lab
            img, lab = canvas, lcanvas
            if tgt is not None:
                tcanvas = torch.zeros_like(targets[k:k + 1])
                tcanvas[..., y:y + n, x:x + n] = tgt
                tgt = tcanvas
        out_i[k], out_l[k] = img[0], lab[0]
        if out_t is not None:
            out_t[k] = tgt[0]
    return (out_i, out_l) if out_t is None else (out_i, out_l, out_t)


@torch.inference_mode()
def predict_labels(model: Student, images: torch.Tensor, batch_size: int = 64,
                   device: torch.device | str = "cpu", size: int | None = None) -> torch.Tensor:
    """Argmax labels ``[N, H, W]`` (long, CPU) of float images ``[N, 3, H, W]`` in [0, 1].
    With ``size``, the images are resized (bilinear) to ``size`` x ``size`` for the model and
    the logits resized back to ``H x W`` before the argmax."""
    from ddps_core.device import autocast

    device = torch.device(device)
    was = model.training
    model.eval()
    try:
        out = []
        hw = tuple(images.shape[-2:])
        for a in range(0, images.shape[0], batch_size):
            x = images[a:a + batch_size].to(device)
            if size is not None and (size, size) != hw:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            with autocast(device):
                logits = model(x).float()
            if tuple(logits.shape[-2:]) != hw:
                logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
            out.append(logits.argmax(1).cpu())
        return torch.cat(out) if out else torch.empty(0, *images.shape[-2:], dtype=torch.long)
    finally:
        model.train(was)


def score_set(model: Student, data: ImageSet, num_classes: int, ignore_index: int,
              boundary_ratio: float = 0.02, batch_size: int = 64,
              device: torch.device | str = "cpu", size: int | None = None) -> Any:
    """The :class:`~ddps_core.metrics.SegmentationResult` of ``model`` on ``data`` (scored at
    ``data``'s size; ``size``: the model's input size, see :func:`predict_labels`)."""
    acc = ConfusionAccumulator(num_classes, ignore_index=ignore_index, boundary_ratio=boundary_ratio)
    for a in range(0, len(data), batch_size):
        idx = list(range(a, min(len(data), a + batch_size)))
        images, labels = data.batch(idx)
        pred = predict_labels(model, images, batch_size, device, size)
        for j, i in enumerate(idx):
            acc.update(pred[j].numpy(), labels[j].numpy(), data.ids[i])
    return acc.result()


_IDENTITY = ("arch", "encoder", "encoder_weights", "image_size", "epochs", "batch_size", "lr",
             "weight_decay", "poly_power", "warmup_steps", "hflip", "scale_min", "scale_max",
             "select_on", "seed")
#: what labelled training adds to the identity (left out for generated, so that an existing
#: run of the generated source keeps its identity)
_LABELLED_IDENTITY = ("source", "iterations", "crop_size", "base_scale", "ratio_range", "cat_max_ratio")
_OPTIMISER_IDENTITY = ("iterations", "optimizer", "min_lr", "momentum", "norm_weight_decay", "head_lr_mult")
_OPTIMISER_DEFAULTS = {"iterations": None, "optimizer": "adamw", "min_lr": 0.0, "momentum": 0.9,
                       "norm_weight_decay": True, "head_lr_mult": 1.0}
_DISTILL_IDENTITY = ("distill", "temperature", "soft_weight", "uncertainty_weight")


def run_settings(cfg: Any) -> dict[str, Any]:
    """The settings that change what is trained (the run identity's settings part)."""
    settings = {k: getattr(cfg, k) for k in _IDENTITY}
    settings["select_on"] = getattr(cfg, "selection", cfg.select_on)
    for k in _OPTIMISER_IDENTITY:  # only where they differ from today's recipe: old runs keep their identity
        if getattr(cfg, k, _OPTIMISER_DEFAULTS[k]) != _OPTIMISER_DEFAULTS[k]:
            settings[k] = getattr(cfg, k)
    if getattr(cfg, "distill", "hard") == "soft":  # hard runs keep the identity they had
        settings.update({k: getattr(cfg, k) for k in _DISTILL_IDENTITY})
    if getattr(cfg, "ema_rate", None) is not None:  # likewise
        settings["ema_rate"] = cfg.ema_rate
    if getattr(cfg, "source", "generated") == "labelled":
        settings.update({k: getattr(cfg, k) for k in _LABELLED_IDENTITY})
        for k in ("scale_min", "scale_max", "image_size"):
            settings.pop(k)
    return settings


_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)


def param_groups(model: Student, cfg: Any) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the encoder at the learning rate, the decoder and
    segmentation head at ``head_lr_mult`` times it (``lr_mult``); parameters of normalisation
    layers without weight decay unless ``norm_weight_decay``."""
    head_mult = float(getattr(cfg, "head_lr_mult", 1.0))
    norm_decay = bool(getattr(cfg, "norm_weight_decay", True))
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.net.named_parameters():
        head = not name.startswith("encoder.")
        no_decay = not norm_decay and id(param) in norm_params
        groups.setdefault((head, no_decay), []).append(param)
    return [{"params": params, "lr_mult": head_mult if head else 1.0,
             "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (head, no_decay), params in sorted(groups.items())]


def make_optimizer(model: Student, cfg: Any) -> torch.optim.Optimizer:
    """AdamW or SGD (``optimizer``) over :func:`param_groups`."""
    groups = param_groups(model, cfg)
    if getattr(cfg, "optimizer", "adamw") == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def set_group_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Each group's rate: ``lr`` times the group's ``lr_mult``."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def _content(data: ImageSet) -> str:
    """The content id of ``data``'s pairs as trained on (squared), with their ids."""
    return content_id(x for i in range(len(data)) for x in (data.ids[i].encode(), *data[i]))


def _averaged(model: Student, rate: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    """The EMA of ``model``'s weights and buffers at decay ``rate`` (None: no average)."""
    if rate is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(rate), use_buffers=True)


def _save_weights(model: Student, path: Path) -> None:
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    atomic_write_bytes(path, save(sd))


def train_student(cfg: Any, train: ImageSet | LabelledCrops, val: ImageSet | None, *, num_classes: int,
                  inputs: Mapping[str, str], ignore_index: int = 255, class_names: list[str] | None = None,
                  device: torch.device | str = "cpu", report: Reporter | None = None,
                  image_size: int | None = None, soft: SoftTargets | None = None) -> dict[str, Any]:
    """Train (or resume) the student of ``cfg`` (a :class:`~ddps_core.config.StudentSettings`)
    on ``train`` (S x S entries, or labelled crops); select on ``val`` (the real labelled images).

    :param soft: the distillation targets of ``train``'s entries (``distill: soft``).

    :param image_size: the side the student predicts at, recorded in ``model.json`` (default:
        ``train.size``).

    :param inputs: content ids of the training data (name -> id, e.g. the export manifest's
        hash): part of the run identity, recorded in ``model.json``.
    :param report: gets ``progress("student", batches, total, loss=, lr=)`` before the first
        batch (no values) and after every batch, and after each epoch's selection
        ``progress("student", batches, total, epoch=, loss=, lr=, mIoU=)`` (the epoch's mean
        loss; ``mIoU`` on ``val`` when selecting on it); and the resume / start-over lines.
    :return: the ``model.json`` record, plus this run's ``train_seconds`` (only here).
    """
    report = report or Reporter()
    clock = TimeBudget(None)  # no limit: this run's time, for the summary
    device = torch.device(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(train) < 1:
        raise DataError("the student's training set is empty")
    selection = getattr(cfg, "selection", cfg.select_on)
    select_real = selection == "real" and val is not None and len(val) > 0
    labelled = isinstance(train, LabelledCrops)
    if getattr(cfg, "distill", "hard") == "soft" and (soft is None or labelled):
        raise DataError("student.distill 'soft' needs the teacher's soft labels of a generated export")
    soft = soft if getattr(cfg, "distill", "hard") == "soft" else None
    settings = {**run_settings(cfg), "num_classes": num_classes, "ignore_index": ignore_index}
    identity = run_id(settings, {**inputs, **({"val": _content(val)} if select_real else {})})
    ckpt = Checkpoint(out / STATE_FILE, identity, unit="epoch", report=report, hint="Lower student.lr.")
    clear_temporaries(out / WEIGHTS_FILE, out / HISTORY_FILE, out / INFO_FILE)
    torch.manual_seed(cfg.seed)
    model = build_student(cfg, num_classes).to(device)
    opt = make_optimizer(model, cfg)
    ema = _averaged(model, getattr(cfg, "ema_rate", None))
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    iterations = getattr(cfg, "iterations", None)
    total = iterations if iterations is not None else steps_per_epoch * cfg.epochs
    n_epochs = -(-total // steps_per_epoch)
    min_lr = float(getattr(cfg, "min_lr", 0.0))
    log = LossLog(("epoch", "loss", "lr", "val_miou"))
    epoch, best, best_epoch = 0, -1.0, -1
    best_state: dict[str, torch.Tensor] | None = None
    if (state := ckpt.resume()) is not None:
        model.net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        epoch, best, best_epoch = ckpt.at, float(state["best"]), int(state["best_epoch"])
        best_state = state["best_model"]
        log.restore(state["log"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    report.progress("student", min(epoch * steps_per_epoch, total), total)
    model.train()
    while epoch < n_epochs:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train), generator=gen).tolist()
        crops = np.random.default_rng([cfg.seed, epoch]) if labelled else None
        losses = []
        for j in range(steps_per_epoch):
            it = epoch * steps_per_epoch + j
            if it >= total:
                break
            lr = min_lr + warmup_poly(it, lr=cfg.lr - min_lr, total=total, warmup=cfg.warmup_steps,
                                      power=cfg.poly_power)
            set_group_lr(opt, lr)
            idx = order[j * cfg.batch_size:(j + 1) * cfg.batch_size]
            if labelled:
                images, labels = train.batch(idx, crops)
            else:
                images, labels = train.batch(idx)
                targets = None if soft is None else soft.batch([train.ids[i] for i in idx], labels)
                images, labels, *targets = augment(images, labels, gen, cfg.hflip, cfg.scale_min, cfg.scale_max,
                                                   ignore_index, targets)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            if soft is None:
                loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
            else:
                loss = distill_loss(logits.float(), labels, targets[0].to(device), temperature=cfg.temperature,
                                    soft_weight=cfg.soft_weight, ignore_index=ignore_index)
            value = float(loss.detach())
            if math.isnan(value) and bool((labels == ignore_index).all()):
                continue  # a batch of only ignore pixels has no loss to follow
            ckpt.check_loss(value, epoch + 1)
            backward_step(loss, opt, model.parameters())
            if ema is not None:
                ema.update_parameters(model)
            losses.append(value)
            report.progress("student", it + 1, total, loss=value, lr=lr)
        epoch += 1
        ckpt.check_weights(model, at=epoch)  # before NaN weights are scored and selected
        scored = model if ema is None else ema.module
        val_miou = None
        if select_real:
            val_miou = float(score_set(scored, val, num_classes, ignore_index, device=device).miou)
        if (val_miou if select_real else epoch) > best:
            best, best_epoch = (val_miou if select_real else float(epoch)), epoch
            best_state = {k: v.detach().cpu().clone() for k, v in scored.net.state_dict().items()}
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        log.add(epoch, mean_loss, lr, val_miou)
        ckpt.save(epoch, {"best": best, "best_epoch": best_epoch, "model": model.net.state_dict(),
                          "optimizer": opt.state_dict(), "best_model": best_state,
                          "torch_rng": torch.get_rng_state(), "log": log.state(),
                          **({} if ema is None else {"ema": ema.state_dict()})}, model)
        log.write(out / HISTORY_FILE)
        report.progress("student", min(epoch * steps_per_epoch, total), total, epoch=epoch, loss=mean_loss, lr=lr,
                        **({"mIoU": val_miou} if val_miou is not None else {}))
    final = copy.deepcopy(model)
    if best_state is not None:
        final.net.load_state_dict(best_state)
    _save_weights(final, out / WEIGHTS_FILE)
    info = {**model.config, "image_size": train.size if image_size is None else int(image_size),
            "feature_channels": model.feature_channels,
            "feature_stride": model.feature_stride, "class_names": class_names, "ignore_index": ignore_index,
            "select_on": "real" if select_real else "last", "best_epoch": best_epoch,
            "val_miou": best if select_real else None, "epochs": epoch, "n_train": len(train),
            "inputs": dict(inputs), "encoder_weights": cfg.encoder_weights}
    if labelled:
        info.update(source="labelled", iterations=total, crop_size=list(train.crop),
                    base_scale=None if train.base_scale is None else list(train.base_scale))
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    return {**info, "train_seconds": clock.elapsed}
