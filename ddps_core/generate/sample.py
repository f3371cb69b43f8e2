"""Sampling images from the trained DDPM into a folder, batch by batch, resumably.

Batch ``b`` holds images ``b * batch_size ..`` and draws all of its noise from its own CPU
generator seeded ``(seed, b)``, so an image depends only on ``(seed, its index,
batch_size)``: a killed run that is rerun redoes only the batches that were not finished and
ends with the same files as an uninterrupted run. A batch's images are written atomically
(``gen_<index>.png``), then its marker ``.batches/<b>.done``; only the marker says the batch
is finished.

The images are stored as 8-bit PNG and every later step (feature extraction, labelling,
export) reads those files. The reference extracts features from the float sample before
quantisation; here the label belongs to exactly the image that is exported (the difference
is below 1/255 per pixel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ddps_core.datasets.common import png_bytes
from ddps_core.io import atomic_write_bytes, atomic_write_text

__all__ = ["batch_generator", "pending_batches", "sample_id", "sample_to_folder", "to_uint8"]


def sample_id(index: int) -> str:
    """File stem of generated image ``index``."""
    return f"gen_{int(index):06d}"


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of batch ``batch``: its noise does not depend on other batches."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(batch))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Samples ``[B, 3, S, S]`` in [-1, 1] -> uint8 ``[B, S, S, 3]`` (round half to even)."""
    y = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def _batch_done(folder: Path, b: int, a: int, stop: int) -> bool:
    return (folder / ".batches" / f"{b:06d}.done").is_file() and \
        all((folder / f"{sample_id(i)}.png").is_file() for i in range(a, stop))


def pending_batches(folder: str | Path, n: int, batch_size: int = 64) -> list[int]:
    """The batches of an ``n``-image sampling into ``folder`` that are not finished."""
    folder = Path(folder)
    return [b for b, a in enumerate(range(0, n, batch_size))
            if not _batch_done(folder, b, a, min(n, a + batch_size))]


def sample_to_folder(model: torch.nn.Module, diffusion, folder: str | Path, n: int, *,
                     batch_size: int = 64, steps: int | None = 50, method: str = "ancestral",
                     seed: int = 0, device: torch.device | str = "cpu",
                     progress: Callable[[int, int], None] | None = None,
                     batches: Iterable[int] | None = None) -> list[str]:
    """Draw ``n`` images into ``folder/gen_<index>.png``; return their ids in order.

    :param diffusion: the model's :class:`~ddps_core.diffusion.gaussian.GaussianDiffusion`;
        ``steps`` evenly respaced steps of it are used (None: every step).
    :param method: ``ancestral`` (the reference; clipped to [-1, 1]) or ``ddim``.
    :param progress: ``progress(n_done, n)`` after every batch, resumed ones included.
    :param batches: only these batches (all by default); a batch's images depend on nothing
        else, so writers of disjoint batches may run concurrently and give the same files.
    """
    folder = Path(folder)
    marks = folder / ".batches"
    marks.mkdir(parents=True, exist_ok=True)
    ids = [sample_id(i) for i in range(n)]
    only = None if batches is None else {int(b) for b in batches}
    for b, a in enumerate(range(0, n, batch_size)):
        if only is not None and b not in only:
            continue
        stop = min(n, a + batch_size)
        mark = marks / f"{b:06d}.done"
        if not _batch_done(folder, b, a, stop):
            x = diffusion.sample(model, stop - a, steps, method, generator=batch_generator(seed, b),
                                 device=device, clip=True)
            for i, img in zip(range(a, stop), to_uint8(x)):
                atomic_write_bytes(folder / f"{ids[i]}.png", png_bytes(img))
            atomic_write_text(mark, f"{a} {stop}\n")
        if progress is not None:
            progress(stop, n)
    return ids
