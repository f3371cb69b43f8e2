"""DDPM-Seg features: decoder-block hooks on a diffusion UNet (:mod:`.extract`), the Zarr v3
feature store at native resolution with on-demand bilinear upsampling, per-shard checksums
and health checks (:mod:`.store`) and its writer lock (:mod:`.lock`), shard-by-shard
resumable filling (:mod:`.fill`) and shuffled pixel batches for the pixel classifiers
(:mod:`.sampler`)."""

from .extract import FeatureExtractor, array_name, preprocess, shared_noise
from .fill import check_compatible, extract_to_store
from .sampler import PixelSampler, valid_pixel_mask
from .store import (
    FeatureStore,
    ShardDamage,
    bilinear_taps,
    footprint,
    open_or_create,
    shard_ranges,
    upsample_pixels,
)

__all__ = [
    "FeatureExtractor",
    "FeatureStore",
    "PixelSampler",
    "ShardDamage",
    "array_name",
    "bilinear_taps",
    "check_compatible",
    "extract_to_store",
    "footprint",
    "open_or_create",
    "preprocess",
    "shard_ranges",
    "shared_noise",
    "upsample_pixels",
    "valid_pixel_mask",
]
