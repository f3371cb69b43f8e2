"""The ``extract`` stage: fill one feature store per split, shard by shard.

The work is split so that an orchestrator can fan it out: :func:`prepare_store` creates (or
validates) a split's store and returns the shards still to do, grouped for ``workers``
writers; :func:`extract_shards` fills a group of shards (each writer loads its own model and
owns whole shards, never sharing one). :func:`run_stage` does everything in-process.

``features.out`` is a folder or an fsspec URL (``s3://bucket/features``): the stores are then
opened through zarr's ``FsspecStore`` with ``storage.options`` (:mod:`ddps_core.storage`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddps_core import storage
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


VARIANTS = ("ddpm", "random_unet")


def store_path(settings: Settings, split: str, variant: str = "ddpm") -> Path | str:
    """``<features.out>/<split>.zarr``; the random-UNet baseline under ``random_unet/``
    (a Path, or a URL string when ``features.out`` is a remote URL)."""
    parts = ([] if variant == "ddpm" else [variant]) + [f"{split}.zarr"]
    return storage.join(settings.features.out, *parts)


def store_exists(settings: Settings, split: str, variant: str = "ddpm") -> bool:
    return FeatureStore.exists(store_path(settings, split, variant), settings.storage.options)


def open_store(settings: Settings, split: str, variant: str = "ddpm", read_only: bool = False) -> FeatureStore:
    """``split``'s store of ``variant`` (a folder or a URL, with ``storage.options``)."""
    return FeatureStore.open(store_path(settings, split, variant), read_only=read_only,
                             storage_options=settings.storage.options)


def variants(settings: Settings) -> list[str]:
    return ["ddpm", "random_unet"] if settings.features.random_unet else ["ddpm"]


def jobs(settings: Settings) -> list[tuple[str, str]]:
    """(variant, split) stores to fill: every split for ``ddpm``; the labelled splits only for
    the random-UNet baseline (it is trained and scored, never used to label the pool)."""
    return [(v, s) for v in variants(settings) for s in settings.features.splits
            if v == "ddpm" or s != "unlabeled"]


def _reader(settings: Settings, split: str) -> DDPMSegFolder:
    return DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)


def _random_unet(settings: Settings, device: Any) -> tuple[Any, dict[str, Any]]:
    """The diffusion preset with random weights, the zero-initialised layers randomised too
    (else features mostly pass through the skips; METHODS.md §8). Seeded by ``seed``."""
    import torch

    from ddps_core.diffusion.checkpoint import state_dict_hash
    from ddps_core.diffusion.unet import randomize_zero_init_

    torch.manual_seed(settings.seed)
    model = get_preset(settings.ddpm.preset, use_fp16=False).build()
    randomize_zero_init_(model, torch.Generator().manual_seed(settings.seed))
    info = {"schedule": settings.ddpm.schedule, "num_timesteps": settings.ddpm.num_timesteps,
            "model_id": "random-" + state_dict_hash(model.state_dict())}
    return model.to(device).eval(), info


def _extractor(settings: Settings, device: Any = None, variant: str = "ddpm") -> FeatureExtractor:
    device = resolve_device(settings.device) if device is None else device
    if variant == "ddpm":
        model, info = load_trained(settings.ddpm.out, device)
    else:
        model, info = _random_unet(settings, device)
    diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
    f = settings.features
    return FeatureExtractor(model, diffusion, f.steps, f.blocks, noise_seed=f.noise_seed,
                            device=device, model_id=info["model_id"])


def _store_settings(settings: Settings, extractor: FeatureExtractor, reader: Any,
                    labelled: bool) -> dict[str, Any]:
    return {**extractor.store_settings(), "image_ids": list(reader.ids),
            "shard_images": settings.features.shard_images,
            "num_classes": reader.num_classes if labelled else None,
            "ignore_index": settings.data.ignore_index if labelled else None}


def open_store_for(settings: Settings, path: str | Path, reader: Any, extractor: FeatureExtractor,
                   labelled: bool, log: Callable[[str], None] | None = None,
                   on_change: str | None = None) -> FeatureStore:
    """Create or reopen the store at ``path`` for ``reader``'s images and ``extractor``'s
    settings. A store made with other settings is rebuilt (``on_change`` / by default
    ``features.on_change`` ``rebuild``, logged) or is an error (``error``); features of
    different settings are never mixed. ``path`` is a folder or a URL (``storage.options``)."""
    options = settings.storage.options
    wanted = _store_settings(settings, extractor, reader, labelled)
    try:
        return open_or_create(path, storage_options=options, **wanted)
    except ConfigError as exc:
        if (on_change or settings.features.on_change) != "rebuild" or not storage.exists(path, options):
            raise
        if log:
            log(f"{exc}; rebuilding it (features.on_change: rebuild)")
        storage.remove_tree(path, options)
        return open_or_create(path, storage_options=options, **wanted)


def prepare_store(settings: Settings, split: str, log: Callable[[str], None] | None = None,
                  variant: str = "ddpm") -> list[list[int]]:
    """Create or reopen ``split``'s store; return the undone shards in ``workers`` groups."""
    extractor = _extractor(settings, device="cpu", variant=variant)
    store = open_store_for(settings, store_path(settings, split, variant), _reader(settings, split),
                           extractor, labelled=split != "unlabeled", log=log)
    return shard_groups(store, settings.features.workers)


def shard_groups(store: FeatureStore, n: int) -> list[list[int]]:
    """``store``'s undone shards dealt round-robin into at most ``n`` disjoint groups."""
    done = store.done_mask()
    todo = [k for k in range(store.num_shards) if not done[slice(*store.shard_range(k))].all()]
    return [todo[i::n] for i in range(max(1, n)) if todo[i::n]]


def prepare_reader_store(settings: Settings, reader: Any, path: str | Path, n_groups: int,
                         labelled: bool = False, log: Callable[[str], None] | None = None,
                         on_change: str | None = None) -> list[list[int]]:
    """:func:`prepare_store` for any ``reader``'s images (e.g. sampled images) at ``path``:
    create or reopen the store, return its undone shards in ``n_groups`` groups."""
    extractor = _extractor(settings, device="cpu")
    store = open_store_for(settings, path, reader, extractor, labelled, log, on_change)
    return shard_groups(store, n_groups)


def extract_reader_shards(settings: Settings, reader: Any, path: str | Path, shards: list[int],
                          progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """:func:`extract_shards` for any ``reader``'s (existing) store at ``path``."""
    store = FeatureStore.open(path, storage_options=settings.storage.options)
    return extract_to_store(reader, _extractor(settings), store, shards,
                            batch_size=settings.features.batch_size, progress=progress)


def fill_store(settings: Settings, reader: Any, path: str | Path, labelled: bool = False,
               progress: Callable[[int], None] | None = None,
               log: Callable[[str], None] | None = None, on_change: str | None = None) -> FeatureStore:
    """Extract the trained DDPM's features of any ``reader``'s images (e.g. sampled images)
    into the store at ``path``, in-process; resumes shard by shard like the ``extract``
    stage, with the same extractor settings (steps, blocks, shared noise)."""
    extractor = _extractor(settings)
    store = open_store_for(settings, path, reader, extractor, labelled, log, on_change)
    extract_to_store(reader, extractor, store, batch_size=settings.features.batch_size, progress=progress)
    return FeatureStore.open(path, read_only=True, storage_options=settings.storage.options)


def extract_shards(settings: Settings, split: str, shards: list[int],
                   progress: Callable[[int], None] | None = None,
                   variant: str = "ddpm") -> dict[str, int]:
    """Fill ``shards`` of ``split``'s (existing) store; this writer owns those shards."""
    store = open_store(settings, split, variant)
    return extract_to_store(_reader(settings, split), _extractor(settings, variant=variant),
                            store, shards,
                            batch_size=settings.features.batch_size, progress=progress)


def run_stage(settings: Settings, progress: Callable[[str, int, int], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All splits (and baseline variants), in-process. ``progress(name, n_done, n_total)``
    after every shard, ``name`` being the split, prefixed by the variant for baselines."""
    summary: dict[str, Any] = {}
    for variant, split in jobs(settings):
        name = split if variant == "ddpm" else f"{variant}/{split}"
        groups = prepare_store(settings, split, log, variant)
        store = open_store(settings, split, variant)
        n = len(store)
        counts = {"images_written": 0, "images_skipped": n}
        if progress:
            progress(name, store.n_done(), n)
        for shards in groups:
            c = extract_shards(settings, split, shards, variant=variant,
                               progress=(lambda done, s=name: progress(s, done, n)) if progress else None)
            counts["images_written"] += c["images_written"]
            counts["images_skipped"] -= c["images_written"]
        summary[name] = {**counts, **open_store(settings, split, variant).info()}
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
