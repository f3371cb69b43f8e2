"""Training the student on a labelled image folder (the generated export), resumably.

Recipe (METHODS.md §5 leaves it open; this is ours): AdamW, a linear warm-up then poly decay
``lr * (1 - it / total) ** poly_power``, cross-entropy with the ignore index, random
horizontal flips and random scales (resize by ``s ~ U[scale_min, scale_max]``, then a random
crop, or a pad with the ignore label, back to the training size), one epoch over the data
in an order that is a function of ``(seed, epoch)``.

Checkpoint selection (the reference): after every epoch the model is scored (mIoU) on the
real labelled images and the best epoch is kept (``select_on: real``); or the last epoch
(``select_on: last``).

Resume: ``state.pt`` (weights, optimiser, epoch, best score, RNG state, history) is written
atomically after every epoch; a rerun with the same settings continues with the next epoch
and ends with the same weights as an uninterrupted run (on CPU). Outputs in ``out``::

    student.safetensors   the selected weights        model.json   config, selection, classes
    history.csv           epoch, loss, lr, val_miou, seconds         state.pt     resume state
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddps_core.device import nonfinite_tensors
from ddps_core.datasets import to_square
from ddps_core.errors import CheckpointError, DataError, DDPSError
from ddps_core.io import atomic_write_bytes, atomic_write_text
from ddps_core.metrics import ConfusionAccumulator
from ddps_core.student.model import INFO_FILE, WEIGHTS_FILE, Student, build_student

__all__ = ["ImageSet", "StudentTrainingError", "augment", "predict_labels", "score_set", "train_student"]

STATE_FILE = "state.pt"
HISTORY_FILE = "history.csv"
_CACHE_BYTES = 1 << 30


class StudentTrainingError(DDPSError):
    """Student training cannot go on (non-finite loss); the last good checkpoint is kept."""


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


def augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, hflip: bool,
            scale_min: float, scale_max: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip and scale per image, back to the input size (see the module doc)."""
    b, _, s, _ = images.shape
    out_i, out_l = torch.empty_like(images), torch.empty_like(labels)
    for k in range(b):
        img, lab = images[k:k + 1], labels[k:k + 1]
        if hflip and torch.rand((), generator=gen) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        scale = scale_min + (scale_max - scale_min) * float(torch.rand((), generator=gen))
        n = max(1, int(round(s * scale)))
        if n != s:
            img = F.interpolate(img, size=(n, n), mode="bilinear", align_corners=False)
            lab = F.interpolate(lab[:, None].float(), size=(n, n), mode="nearest")[:, 0].long()
        if n >= s:
            y, x = (int(torch.randint(0, n - s + 1, (2,), generator=gen)[j]) for j in range(2))
            img, lab = img[..., y:y + s, x:x + s], lab[..., y:y + s, x:x + s]
        else:
            y, x = (int(torch.randint(0, s - n + 1, (2,), generator=gen)[j]) for j in range(2))
            canvas = torch.zeros_like(images[k:k + 1])
            canvas[..., y:y + n, x:x + n] = img
            lcanvas = torch.full_like(labels[k:k + 1], ignore_index)
            lcanvas[..., y:y + n, x:x + n] = lab
            img, lab = canvas, lcanvas
        out_i[k], out_l[k] = img[0], lab[0]
    return out_i, out_l


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


def _lr_at(cfg: Any, it: int, total: int) -> float:
    if cfg.warmup_steps and it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    frac = min(max(it - cfg.warmup_steps, 0) / max(total - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (1.0 - frac) ** cfg.poly_power


_IDENTITY = ("arch", "encoder", "encoder_weights", "image_size", "epochs", "batch_size", "lr",
             "weight_decay", "poly_power", "warmup_steps", "hflip", "scale_min", "scale_max",
             "select_on", "seed")


def _digest(cfg: Any, extra: dict[str, Any]) -> str:
    ident = {k: getattr(cfg, k) for k in _IDENTITY}
    ident.update(extra)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_weights(model: Student, path: Path) -> None:
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    atomic_write_bytes(path, save(sd))


def train_student(cfg: Any, train: ImageSet, val: ImageSet | None, *, num_classes: int,
                  ignore_index: int = 255, class_names: list[str] | None = None,
                  device: torch.device | str = "cpu", data_id: str = "",
                  on_epoch: Callable[[dict[str, Any]], None] | None = None,
                  on_batch: Callable[[int, int], None] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the student of ``cfg`` (a :class:`~ddps_core.config.StudentSettings`)
    on ``train``; select on ``val`` (the real labelled images). Returns the summary written
    to ``model.json``."""
    say = log or (lambda _m: None)
    device = torch.device(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(train) < 1:
        raise DataError("the student's training set is empty")
    select_real = cfg.select_on == "real" and val is not None and len(val) > 0
    digest = _digest(cfg, {"data_id": data_id, "num_classes": num_classes, "n_train": len(train),
                           "n_val": len(val) if val is not None else 0})
    torch.manual_seed(cfg.seed)
    model = build_student(cfg, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    epoch, best, best_epoch, history = 0, -1.0, -1, []
    best_state: dict[str, torch.Tensor] | None = None
    state_path = out / STATE_FILE
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{state_path}: cannot read the student training state ({exc}); "
                                  "delete it to start over") from None
        if state.get("digest") == digest:
            model.net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            epoch, best, best_epoch = int(state["epoch"]), float(state["best"]), int(state["best_epoch"])
            best_state = state.get("best_model")
            history = [dict(h) for h in json.loads(state["history"])]
            say(f"resuming student training after epoch {epoch} ({state_path})")
        else:
            say(f"{state_path} was trained with other settings or data: starting over")
    model.train()
    while epoch < cfg.epochs:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train), generator=gen).tolist()
        losses = []
        for j in range(steps_per_epoch):
            it = epoch * steps_per_epoch + j
            lr = _lr_at(cfg, it, total)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[j * cfg.batch_size:(j + 1) * cfg.batch_size]
            images, labels = train.batch(idx)
            images, labels = augment(images, labels, gen, cfg.hflip, cfg.scale_min, cfg.scale_max, ignore_index)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
            if not torch.isfinite(loss):
                if (labels == ignore_index).all():
                    continue  # a batch of only ignore pixels has no loss to follow
                raise StudentTrainingError(f"non-finite student loss at epoch {epoch + 1}; the last good "
                                           f"checkpoint ({state_path}) is kept. Lower student.lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_batch is not None:
                on_batch(it + 1, total)
        epoch += 1
        bad = nonfinite_tensors(model)
        if bad:  # a finite loss does not prove finite weights (NaN gradients)
            raise StudentTrainingError(
                f"non-finite student weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) "
                f"after epoch {epoch}; the last good checkpoint ({state_path}) is kept. Lower student.lr.")
        val_miou = None
        if select_real:
            val_miou = float(score_set(model, val, num_classes, ignore_index, device=device).miou)
        better = (val_miou if select_real else epoch) > best
        if better:
            best, best_epoch = (val_miou if select_real else float(epoch)), epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
        row = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr,
               "val_miou": val_miou, "seconds": time.perf_counter() - t0}
        history.append(row)
        buf = io.BytesIO()
        torch.save({"digest": digest, "epoch": epoch, "best": best, "best_epoch": best_epoch,
                    "model": model.net.state_dict(), "optimizer": opt.state_dict(),
                    "best_model": best_state, "torch_rng": torch.get_rng_state(),
                    "history": json.dumps(history)}, buf)
        atomic_write_bytes(state_path, buf.getvalue())
        _write_history(out / HISTORY_FILE, history)
        if on_epoch is not None:
            on_epoch(row)
    final = copy.deepcopy(model)
    if best_state is not None:
        final.net.load_state_dict(best_state)
    _save_weights(final, out / WEIGHTS_FILE)
    info = {**model.config, "image_size": train.size, "feature_channels": model.feature_channels,
            "feature_stride": model.feature_stride, "class_names": class_names, "ignore_index": ignore_index,
            "select_on": "real" if select_real else "last", "best_epoch": best_epoch,
            "val_miou": best if select_real else None, "epochs": epoch, "n_train": len(train),
            "data_id": data_id, "encoder_weights": cfg.encoder_weights,
            "train_seconds": float(sum(h["seconds"] for h in history))}
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    return info


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["epoch", "loss", "lr", "val_miou", "seconds"])
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v))
                    for k, v in h.items()})
    atomic_write_text(path, buf.getvalue())
