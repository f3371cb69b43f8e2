"""The streaming-labels benchmark (tiny sizes): every image labelled, no feature store written,
and rows that say what was measured."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import bench_label_stream


@pytest.mark.slow  # a process per N, each loading the models: about a minute
def test_labels_every_image_with_no_store(tmp_path):
    records = bench_label_stream.measure((2, 4), {2: 1, 4: 2}, n_distinct=2, work=tmp_path)
    for n, r in records.items():
        # the child's own count of what it wrote, and the kept folder read here
        assert r["label_pngs"] == r["uncertainty_pngs"] == r["scores_rows"] == n
        assert not r["leftover_parts"]
        folder = tmp_path / f"n{n}" / f"labels-{n}-0"
        ids = [f"img_{i:05d}" for i in range(n)]
        for i in ids:
            assert (folder / f"{i}.png").is_file() and (folder / f"{i}_uncertainty.png").is_file()
        assert list(pd.read_parquet(folder / "scores.parquet")["image_id"]) == ids
        assert r["output_bytes"] > 0 and r["work_bytes_outside_dataset_and_labels"] == 0
        assert r["zarr"] == [] and r["work_zarr"] == []
        assert len(r["label_s"]) == len(r["forward_s"]) == r["repeats"]
        assert all(t > 0 for t in r["label_s"] + r["forward_s"])
        assert r["peak_rss_mb"] >= r["rss_after_warmup_mb"] > 0
        # the breakdown's parts are each >= 0 and add up to the labelling's time
        b = r["breakdown_s"]
        assert min(b.values()) >= 0
        assert abs(sum(b.values()) - sorted(r["label_s"])[len(r["label_s"]) // 2]) < 1e-6
    assert not list(tmp_path.rglob("*.zarr"))

    rows = {row["name"].split("/")[1]: row for row in bench_label_stream.rows(records)}
    assert set(rows) == {"tiny32-2", "tiny32-4", "peak_rss_4_vs_2", "disk_4_vs_2", "store_avoided_4"}
    speed = rows["tiny32-4"]
    assert speed["target"] == "<= 1.25x" and speed["ratio"] > 0 and speed["value"] > 0
    assert speed["settings"]["output_bytes_per_image"] > 0 and speed["settings"]["zarr_written"] == []
    assert 0.5 < rows["peak_rss_4_vs_2"]["ratio"] < 2
    disk = rows["disk_4_vs_2"]
    assert disk["value"] > disk["baseline_value"] and disk["settings"]["bytes_outside_labels"] == [0, 0]
    ref = rows["store_avoided_4"]["settings"]["reference_256"]
    assert ref["steps"] == [50, 150, 250] and ref["blocks"] == [5, 6, 7, 8, 12] and ref["n_images"] == 4
    # the official 256 configuration: tens of MB of native float16 features per image
    assert 10e6 < ref["native_float16_bytes_per_image"] < 200e6
    assert rows["store_avoided_4"]["value"] > rows["disk_4_vs_2"]["value"]


def test_reference_store_scales_with_images():
    one, many = bench_label_stream.reference_store(1), bench_label_stream.reference_store(2000)
    assert many["native_float16_bytes"] == 2000 * one["native_float16_bytes_per_image"]
    assert one["feature_dim"] == many["feature_dim"] > 0
