"""Stage ``train_ddpm``: the diffusion model every feature comes from.

With ``ddpm.checkpoint`` set (an official guided-diffusion ``.pt`` or a ``.safetensors``),
the checkpoint is validated by a strict load into ``ddpm.preset``'s UNet and recorded in
``<ddpm.out>/model.json``; nothing is trained. Otherwise the UNet is trained on every image
of the dataset's ``unlabeled/`` and ``real/train/`` folders (:mod:`.train`), then a grid of
samples is drawn from its EMA weights (``samples.png``).

Later stages load the result with :func:`load_trained`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddps_core.config import DDPMSettings, Settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.device import autocast, resolve_device, torch_threads
from ddps_core.diffusion.checkpoint import load_unet
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion import train as training
from ddps_core.diffusion.train import INFO_FILE, SAMPLES_FILE, WEIGHTS_FILE, model_info
from ddps_core.diffusion.unet import UNetModel
from ddps_core.errors import DataError
from ddps_core.io import atomic_write_text
from ddps_core.progress import Reporter
from ddps_core.stages import Stage
from ddps_core.training import content_id, read_record
from ddps_core.viz import grid, save_png

__all__ = ["TRAIN_DDPM", "load_trained", "load_training_images", "sample_grid", "train_ddpm",
           "use_checkpoint"]


def center_crop_like_guided_diffusion(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``size x size x 3`` of an ``H x W x 3`` image, as guided-diffusion's
    ``image_datasets.center_crop_arr`` makes its training images: halve with a box filter while
    the short side is at least ``2 * size``, resize bicubically so that the short side is
    ``size`` (each side ``round(side * size / short)``), and cut the central square (offset
    ``(side - size) // 2``). An image already ``size x size`` is returned unchanged."""
    im = Image.fromarray(np.ascontiguousarray(image), "RGB")
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size].copy()


def load_training_images(root: str | Path, image_size: int,
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """All images of ``root/unlabeled`` and ``root/real/train`` as ``uint8 [N, 3, S, S]``, in
    the order of their content (sha256 of the ``S x S`` pixels).

    The order is the images' own, not the folders': an image that moves from the pool to the
    labelled split (``ddps data add-labels``) leaves the training set, its batches and so the
    run's identity as they were, and the finished model is reused.

    Every image is made ``S x S`` as guided-diffusion's training data is
    (:func:`center_crop_like_guided_diffusion`), whatever ``data.resize`` says: the diffusion
    model learns the distribution of centre crops, as the released checkpoints did.
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
    keys = []
    i = 0
    for reader in readers:
        for sample in reader:
            image = np.ascontiguousarray(center_crop_like_guided_diffusion(sample.image, image_size))
            keys.append(hashlib.sha256(image.tobytes()).digest())
            out[i] = torch.from_numpy(image).permute(2, 0, 1)
            i += 1
            if progress is not None:
                progress(i)
    order = sorted(range(total), key=keys.__getitem__)
    return out[torch.tensor(order, dtype=torch.long)] if total else out


def sample_grid(model: UNetModel, diffusion: GaussianDiffusion, n: int, steps: int, method: str,
                seed: int, device: torch.device,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``n`` samples as one uint8 grid picture (square-ish layout, upscaled small images);
    ``progress(done, total)`` after every sampling step."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode(), autocast(device):
        x = diffusion.sample(model, n, steps=steps, method=method, generator=gen, device=device,
                             progress=progress)
    imgs = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    cols = int(math.ceil(math.sqrt(n)))
    rows = [list(imgs[r * cols:(r + 1) * cols]) for r in range(int(math.ceil(n / cols)))]
    return grid(rows, scale=max(1, 128 // imgs.shape[1]))


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
    """The model stage ``train_ddpm`` produced (trained EMA weights or the user checkpoint)."""
    out = Path(out)
    info = read_record(out / INFO_FILE, "no diffusion model here; run the train_ddpm stage (`ddps ddpm train`) first",
                       rerun="train_ddpm")
    path = info.get("checkpoint") or out / WEIGHTS_FILE
    model = load_unet(path, preset=info["preset"])
    return model.to(device).eval(), info


def train_ddpm(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``train_ddpm``: adopt ``ddpm.checkpoint``, or train on ``data.out`` (resuming
    when it can) and draw ``samples.png``."""
    cfg = settings.ddpm
    if cfg.checkpoint:
        report.log(f"using the checkpoint {cfg.checkpoint} ({cfg.preset}); nothing to train")
        return use_checkpoint(cfg)
    device = resolve_device(settings.device)
    with torch_threads(cfg.threads):
        report.progress("load images", 0, None)
        images = load_training_images(settings.data.out, get_preset(cfg.preset).image_size,
                                      lambda n: report.progress("load images", n, None))
        summary = training.train_ddpm(cfg, images, device, seed=settings.seed,
                                      inputs={"images": content_id([images])}, report=report)
        report.log(f"diffusion model: {summary['steps']} steps ({summary['steps_this_run']} this run, "
                   f"{summary['images_per_s'] or 0:.1f} images/s) -> {cfg.out}")
        if cfg.sample_count:
            model, info = load_trained(cfg.out, device)
            diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
            task = f"samples ({cfg.sample_count} images, {cfg.sample_steps} steps)"
            report.progress(task, 0, cfg.sample_steps)
            picture = sample_grid(model, diffusion, cfg.sample_count, cfg.sample_steps, cfg.sample_method,
                                  settings.seed, device, lambda d, n: report.progress(task, d, n))
            save_png(picture, Path(cfg.out) / SAMPLES_FILE)
            summary["samples"] = str(Path(cfg.out) / SAMPLES_FILE)
    return summary


TRAIN_DDPM = Stage("train_ddpm", main=train_ddpm, products=lambda s: [s.ddpm.out])
