"""The extraction benchmark and its sampler row run (tiny sizes) and record what they measured."""

from __future__ import annotations

from benchmarks import bench_extract


def test_extraction_row_records_both_orders_of_its_pairs():
    (row,) = bench_extract.run(n_images=8, batch_size=4, repeats=2)  # both orders of a pair
    assert row["name"] == "extract/tiny32" and row["target"] == "<= 1.3x"
    assert row["settings"]["repeats"] == len(row["settings"]["pair_ratios"]) == 2
    assert row["value"] > 0 and row["baseline_value"] > 0 and row["ratio"] > 0


def test_sampler_row_counts_every_valid_pixel():
    (row,) = bench_extract.run_sampler(n_images=4, repeats=2)
    s = row["settings"]
    assert row["name"] == "extract/sampler-tiny32" and row["unit"] == "pixels/s"
    assert s["n_pixels"] == 4 * 32 * 32  # min_class_pixels=1: every labelled pixel (no ignore in synthetic labels)
    assert row["value"] > 0 and row["baseline_value"] > 0
    assert row["ratio"] > 0 and len(s["pixels_per_s"]) == 2
