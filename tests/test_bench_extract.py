"""The extraction benchmark runs (tiny sizes) with the pipeline's allocator settings, and its
glibc-defaults row really runs without them."""

from __future__ import annotations

from benchmarks import bench_extract
from tests.test_runtime import GLIBC


def test_rows_record_the_allocator_settings():
    small = {"n_images": 8, "batch_size": 4, "repeats": 1}
    (tuned,) = bench_extract.run(**{**small, "repeats": 2})  # both orders of a pair
    (defaults,) = bench_extract.run_glibc_defaults(**small)
    assert tuned["name"] == "extract/tiny32" and defaults["name"] == "extract/tiny32-glibc-defaults"
    assert tuned["settings"]["malloc_tuning"] is GLIBC
    assert defaults["settings"]["malloc_tuning"] is False
    assert tuned["settings"]["direct_io"] is False  # 8 small images: written through the cache
    assert tuned["settings"]["repeats"] == len(tuned["settings"]["pair_ratios"]) == 2
    for row in (tuned, defaults):
        assert row["value"] > 0 and row["baseline_value"] > 0 and row["ratio"] > 0
