"""Flow of the ``extract`` stage: DDPM-Seg features of every split into Zarr stores.

Per split, one task prepares the store and groups the undone shards; one task per group then
fills its shards (``features.workers`` groups, run concurrently by the task runner that
``runner`` names: threads here, or Dask workers; each task owns whole shards).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from ddps_core.config import Settings
from ddps_core.features.stage import jobs, open_store
from flows.common import settings_for, with_runner
from tasks.features import extract_shards_task, prepare_store_task


@flow(name="extract_features_shards", log_prints=True)
def extract_shards_flow(settings: Settings) -> dict[str, Any]:
    """Every store's shards, fanned out on this flow's task runner."""
    summary: dict[str, Any] = {}
    for variant, split in jobs(settings):
        name = split if variant == "ddpm" else f"{variant}/{split}"
        groups = prepare_store_task(settings, split, variant)
        futures = [extract_shards_task.submit(settings, split, shards, variant) for shards in groups]
        written = sum(f.result()["images_written"] for f in futures)
        info = open_store(settings, split, variant, read_only=True).info()
        summary[name] = {"images_written": written, **info}
        print(f"{name}: {info['n_done']}/{info['n_images']} images, "
              f"{info['bytes_per_image'] / 1e6:.2f} MB/image on disk, "
              f"{info['ratio']:.1f}x smaller than upsampled float32")
    return summary


@flow(name="extract_features", log_prints=True)
def extract_features_flow(features: dict[str, Any] | None = None,
                          params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``extract``. ``features`` holds partial overrides of the ``features`` section."""
    settings = settings_for(params_path, {"features": features})
    return with_runner(extract_shards_flow, settings, max_workers=4)(settings)


if __name__ == "__main__":
    extract_features_flow()
