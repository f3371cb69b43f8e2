"""Stage ``extract``: DDPM-Seg features of the splits of ``features.splits`` (by default the
training split only, what the teacher learns from; the other images are labelled streaming)
into one feature store per split.

Stores: ``<features.out>/<split>.zarr`` with the trained diffusion model's features, and, when
the teacher has the ``random_unet`` baseline, ``<features.out>/random_unet/<split>.zarr``
with a randomly initialised UNet's (the labelled splits only: the baseline is trained and
scored, never used to label the pool).

The stage fans out by shard. Its one step, ``shards``, creates (or validates) each store and
deals the shards still to do into ``features.workers`` groups; each group is filled by a
writer that loads its own model and owns its shards. ``features.out`` may be an fsspec URL
(``s3://bucket/features``): the stores are then opened through zarr's ``FsspecStore`` with
``storage.options``.

The training split's store holds what the teacher trains on: its images under ``data.resize``
(:class:`~ddps_core.datasets.training.TrainingView`): in ``whole`` mode one ``S x S`` entry per
image, in ``slide`` mode one entry per window, ``<image id>@<y>_<x>``. The other splits' images
go to their stores as read, and the filler squares them (the prediction side's geometry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddps_core import storage
from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.datasets.training import TrainingView
from ddps_core.device import resolve_device
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.errors import ConfigError
from ddps_core.features.extract import FeatureExtractor
from ddps_core.features.fill import extract_to_store
from ddps_core.features.store import FeatureStore, footprint, open_or_create
from ddps_core.progress import Reporter
from ddps_core.stages import Stage, Step

__all__ = ["EXTRACT", "fill_store", "model_size", "open_store", "reference_footprint", "store_path",
           "training_reader"]

#: The feature variants a store can hold: the trained model's, or the random-UNet baseline's.
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


def jobs(settings: Settings) -> list[tuple[str, str]]:
    """The (variant, split) stores of the stage: every split for ``ddpm``; the labelled
    splits for ``random_unet`` when the teacher has that baseline."""
    variants = ["ddpm"] + (["random_unet"] if "random_unet" in settings.teacher.baselines else [])
    return [(v, s) for v in variants for s in settings.features.splits if v == "ddpm" or s != "unlabeled"]


def _name(variant: str, split: str) -> str:
    return split if variant == "ddpm" else f"{variant}/{split}"


def _reader(settings: Settings, split: str) -> Any:
    """``split``'s images as the store holds them: the training split as the teacher trains on
    it (:func:`training_reader`: ``data.resize``), the other splits as read."""
    reader = DDPMSegFolder(settings.data.out, split, ignore_index=settings.data.ignore_index)
    return training_reader(settings, reader) if split == "train" else reader


def model_size(settings: Settings) -> int:
    """S, the diffusion model's image size (``ddpm.preset``)."""
    return int(get_preset(settings.ddpm.preset).image_size)


def training_reader(settings: Settings, reader: Any, size: int | None = None) -> TrainingView:
    """``reader``'s training entries at ``size`` (the diffusion model's by default) under
    ``data.resize`` / ``data.stride`` (:class:`~ddps_core.datasets.training.TrainingView`)."""
    return TrainingView(reader, model_size(settings) if size is None else size, settings.data.resize,
                        settings.data.stride)


def _random_unet(settings: Settings, device: Any) -> tuple[Any, dict[str, Any]]:
    """The diffusion preset with random weights, its zero-initialised layers randomised too:
    guided-diffusion zero-initialises the last conv of every block, so an untouched random
    UNet passes its input through the skips and would be a weak control. Seeded by ``seed``."""
    import torch

    from ddps_core.diffusion.checkpoint import state_dict_hash
    from ddps_core.diffusion.unet import randomize_zero_init_

    torch.manual_seed(settings.seed)
    model = get_preset(settings.ddpm.preset, use_fp16=False).build()
    randomize_zero_init_(model, torch.Generator().manual_seed(settings.seed))
    info = {"schedule": settings.ddpm.schedule, "num_timesteps": settings.ddpm.num_timesteps,
            "model_id": "random-" + state_dict_hash(model.state_dict())}
    return model.to(device).eval(), info


def extractor(settings: Settings, device: Any = None, variant: str = "ddpm") -> FeatureExtractor:
    """The feature extractor of ``variant`` with the settings of ``features``."""
    from ddps_core.diffusion.stage import load_trained

    device = resolve_device(settings.device) if device is None else device
    model, info = load_trained(settings.ddpm.out, device) if variant == "ddpm" else _random_unet(settings, device)
    diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
    f = settings.features
    return FeatureExtractor(model, diffusion, f.steps, f.blocks, noise_seed=f.noise_seed,
                            device=device, model_id=info["model_id"], noise_device=f.noise_device)


def open_for_writing(settings: Settings, path: str | Path, reader: Any, ext: FeatureExtractor,
                     labelled: bool, report: Reporter, on_change: str | None = None) -> FeatureStore:
    """Create or reopen the store at ``path`` for ``reader``'s images and ``ext``'s settings.
    A store made with other settings is rebuilt (``on_change`` / ``features.on_change``
    ``rebuild``, said through ``report``) or is an error (``error``): features of different
    settings are never mixed."""
    options = settings.storage.options
    wanted = {**ext.store_settings(), "image_ids": list(reader.ids),
              "shard_images": settings.features.shard_images,
              "num_classes": reader.num_classes if labelled else None,
              "ignore_index": settings.data.ignore_index if labelled else None,
              # images or labels changed under the same names: their features are made again
              "inputs_id": reader.content_id() if hasattr(reader, "content_id") else None}
    try:
        store = open_or_create(path, storage_options=options, **wanted)
    except ConfigError as exc:
        if (on_change or settings.features.on_change) != "rebuild" or not storage.exists(path, options):
            raise
        report.log(f"{exc}; rebuilding it (features.on_change: rebuild)")
        storage.remove_tree(path, options)
        store = open_or_create(path, storage_options=options, **wanted)
    for damage in store.repaired:
        report.log(f"{path}: {damage}; extracting that shard again")
    return store


def shard_groups(store: FeatureStore, n: int) -> list[list[int]]:
    """``store``'s undone shards dealt round-robin into at most ``n`` disjoint groups."""
    done = store.done_mask()
    todo = [k for k in range(store.num_shards) if not done[slice(*store.shard_range(k))].all()]
    return [todo[i::n] for i in range(max(1, n)) if todo[i::n]]


def fill_shards(settings: Settings, reader: Any, path: str | Path, shards: list[int], task: str,
                report: Reporter, variant: str = "ddpm", token: str | None = None) -> int:
    """Fill ``shards`` of the (existing) store at ``path`` with ``reader``'s images; this
    writer owns those shards and writes under the run's writer lock ``token`` (the planning
    step's: a writer in another process is refused without it). Returns the number of
    images written."""
    store = FeatureStore.open(path, storage_options=settings.storage.options, token=token)
    n = len(store)
    report.progress(task, store.n_done(), n)
    counts = extract_to_store(reader, extractor(settings, variant=variant), store, shards,
                              batch_size=settings.features.batch_size,
                              progress=lambda done: report.progress(task, done, n))
    return counts["images_written"]


def fill_store(settings: Settings, reader: Any, path: str | Path, task: str, report: Reporter,
               labelled: bool = False, on_change: str | None = None) -> FeatureStore:
    """Every shard of the store at ``path`` for any ``reader``'s images (sampled images, say),
    in-process, with the trained model and the stage's extractor settings."""
    ext = extractor(settings)
    store = open_for_writing(settings, path, reader, ext, labelled, report, on_change)
    report.progress(task, store.n_done(), len(store))
    with store:  # gives the writer lock back, done or not
        extract_to_store(reader, ext, store, batch_size=settings.features.batch_size,
                         progress=lambda done: report.progress(task, done, len(store)))
    return FeatureStore.open(path, read_only=True, storage_options=settings.storage.options)


# --------------------------------------------------------------------------- the stage
def plan_shards(settings: Settings, n: int, report: Reporter) -> list[dict[str, Any]]:
    """Create or validate every store; the shards still to do, ``n`` groups per store."""
    groups = []
    for variant, split in jobs(settings):
        reader = _reader(settings, split)
        ext = extractor(settings, device="cpu", variant=variant)
        store = open_for_writing(settings, store_path(settings, split, variant), reader, ext,
                                 labelled=split != "unlabeled", report=report)
        todo = shard_groups(store, n)
        if not todo:
            report.log(f"{_name(variant, split)}: all {len(store)} images already extracted")
        groups += [{"variant": variant, "split": split, "shards": shards, "token": store.token}
                   for shards in todo]
    return groups


def extract_shards(settings: Settings, group: dict[str, Any], report: Reporter) -> int:
    """Fill one group of :func:`plan_shards`."""
    variant, split = group["variant"], group["split"]
    return fill_shards(settings, _reader(settings, split), store_path(settings, split, variant),
                       group["shards"], f"extract {_name(variant, split)}", report, variant,
                       token=group.get("token"))


def extract(settings: Settings, report: Reporter) -> dict[str, Any]:
    """What the stores hold once every shard is done: sizes and the ratio to the upsampled
    float32 features the reference keeps (``features info`` shows the same)."""
    summary = {}
    for variant, split in jobs(settings):
        store = open_store(settings, split, variant, read_only=True)
        store.release()  # the run is over: the planning step's writer lock goes back
        info = store.info()
        summary[_name(variant, split)] = info
        report.log(f"{_name(variant, split)}: {info['n_done']}/{info['n_images']} images, "
                   f"{info['bytes_per_image'] / 1e6:.2f} MB/image, "
                   f"{info['ratio'] or 0:.1f}x smaller than upsampled float32")
    return summary


EXTRACT = Stage("extract", main=extract, products=lambda s: [str(s.features.out)],
                steps=(Step("shards", plan_shards, extract_shards, groups=lambda s: s.features.workers),))


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
