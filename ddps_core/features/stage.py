"""The ``extract`` stage: fill one feature store per split, shard by shard.

The work is split so that an orchestrator can fan it out: :func:`prepare_store` creates (or
validates) a split's store and returns the shards still to do, grouped for ``workers``
writers; :func:`extract_shards` fills a group of shards (each writer loads its own model and
owns whole shards, never sharing one). :func:`run_stage` does everything in-process.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.device import resolve_device
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion.train import load_trained
from ddps_core.errors import ConfigError
from ddps_core.features.extract import FeatureExtractor
from ddps_core.features.fill import extract_to_store
from ddps_core.features.store import FeatureStore, footprint, open_or_create


def store_path(settings: Settings, split: str) -> Path:
    return Path(settings.features.out) / f"{split}.zarr"


def _reader(settings: Settings, split: str) -> DDPMSegFolder:
    return DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)


def _extractor(settings: Settings, device: Any = None) -> FeatureExtractor:
    device = resolve_device(settings.device) if device is None else device
    model, info = load_trained(settings.ddpm.out, device)
    diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
    f = settings.features
    return FeatureExtractor(model, diffusion, f.steps, f.blocks, noise_seed=f.noise_seed,
                            device=device, model_id=info["model_id"])


def _store_settings(settings: Settings, split: str, extractor: FeatureExtractor,
                    reader: DDPMSegFolder) -> dict[str, Any]:
    labelled = split != "unlabeled"
    return {**extractor.store_settings(), "image_ids": list(reader.ids),
            "shard_images": settings.features.shard_images,
            "num_classes": reader.num_classes if labelled else None,
            "ignore_index": settings.data.ignore_index if labelled else None}


def prepare_store(settings: Settings, split: str, log: Callable[[str], None] | None = None,
                  ) -> list[list[int]]:
    """Create or reopen ``split``'s store; return the undone shards in ``workers`` groups.

    A store made with other settings is rebuilt (``features.on_change: rebuild``, logged) or
    is an error (``error``); features of different settings are never mixed.
    """
    path = store_path(settings, split)
    reader = _reader(settings, split)
    extractor = _extractor(settings, device="cpu")
    wanted = _store_settings(settings, split, extractor, reader)
    try:
        store = open_or_create(path, **wanted)
    except ConfigError as exc:
        if settings.features.on_change != "rebuild" or not path.exists():
            raise
        if log:
            log(f"{exc}; rebuilding it (features.on_change: rebuild)")
        shutil.rmtree(path)
        store = open_or_create(path, **wanted)
    todo = [k for k in range(store.num_shards) if not store.shard_done(k)]
    n = settings.features.workers
    return [todo[i::n] for i in range(n) if todo[i::n]]


def extract_shards(settings: Settings, split: str, shards: list[int],
                   progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Fill ``shards`` of ``split``'s (existing) store; this writer owns those shards."""
    store = FeatureStore.open(store_path(settings, split))
    return extract_to_store(_reader(settings, split), _extractor(settings), store, shards,
                            batch_size=settings.features.batch_size, progress=progress)


def run_stage(settings: Settings, progress: Callable[[str, int, int], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All splits, in-process. ``progress(split, n_done, n_total)`` after every shard."""
    summary: dict[str, Any] = {}
    for split in settings.features.splits:
        groups = prepare_store(settings, split, log)
        store = FeatureStore.open(store_path(settings, split))
        n = len(store)
        counts = {"images_written": 0, "images_skipped": n}
        if progress:
            progress(split, store.n_done(), n)
        for shards in groups:
            c = extract_shards(settings, split, shards,
                               progress=(lambda done, s=split: progress(s, done, n)) if progress else None)
            counts["images_written"] += c["images_written"]
            counts["images_skipped"] -= c["images_written"]
        summary[split] = {**counts, **FeatureStore.open(store_path(settings, split)).info()}
    return summary


def reference_footprint(preset: str = "adm-256-lsun", steps: tuple[int, ...] = (50, 150, 250),
                        blocks: tuple[int, ...] = (5, 6, 7, 8, 12)) -> dict[str, Any]:
    """Bytes per image, native float16 vs upsampled float32, from shapes alone (meta device)."""
    import torch

    cfg = get_preset(preset, use_fp16=False)
    with torch.device("meta"):
        model = cfg.build()
    diffusion = GaussianDiffusion.from_name("linear", 1000)
    ext = FeatureExtractor(model, diffusion, list(steps), list(blocks), device="meta",
                           model_id="shape-only")
    return {"preset": preset, "steps": list(steps), "blocks": list(blocks),
            "feature_dim": ext.feature_dim, **footprint(ext.shapes(), cfg.image_size)}
