"""The GPU benchmark's bookkeeping, run on the CPU at tiny sizes (its figures only mean
something on a GPU), and the runner keeping it out of CPU runs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import bench_gpu, runner
from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.features import FeatureExtractor

TINY = {"device": "cpu", "preset": "tiny32", "steps": (10, 50), "blocks": (1, 3), "batch": 4,
        "max_batch": 8, "n_batches": 2, "repeats": 1, "store_repeats": 1, "probe_bytes": 8 << 20,
        "matmul_n": 512}


@pytest.mark.parametrize("channels_last", [None, True])
def test_extraction_rows_are_consistent(channels_last):
    logs: list[str] = []
    rows = bench_gpu.extraction(**TINY, channels_last=channels_last, log=logs.append)
    layout = "channels_last" if channels_last else "contiguous"
    names = [r["name"] for r in rows]
    assert names == [f"gpu/{k}-tiny32-{layout}" for k in
                     ("unet_forward", "extract-hooked", "extract-into-pageable", "extract-into-pinned",
                      "extract-store")]
    forward, *extract = rows
    s = forward["settings"]
    assert s["largest_batch"] == 8 and s["batch"] == 4 and s["n_images"] == 8
    assert set(s["forward_img_s_by_batch"]) == {8}  # the search starts at 8, capped at 8
    assert s["memory_format"] == layout
    # the extractor stops after block 3 of 6: fewer FLOPs per step than a full forward
    assert 0 < s["gflops_hooked_per_step"] < s["gflops_forward"]
    for row in extract:
        assert row["baseline_value"] == pytest.approx(8 / np.median(forward["settings"]["times_s"]))
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline_value"])
        assert row["value"] == pytest.approx(8 / np.median(row["settings"]["times_s"]))
        ratio = row["settings"]["fraction_of_peak"] / row["settings"]["fraction_of_peak_in_forward_flops"]
        assert ratio == pytest.approx(s["gflops_hooked_per_step"] / s["gflops_forward"])
    by = {r["name"].split("-tiny32")[0]: r for r in rows}
    assert by["gpu/extract-into-pinned"]["settings"]["same_bytes_as_pageable"] is True
    assert by["gpu/extract-into-pinned"]["settings"]["pinned"] is False  # no CUDA: ordinary memory
    assert any(line.startswith("disk write rate") for line in logs)


def test_only_the_chosen_variants_are_timed():
    rows = bench_gpu.extraction(**TINY, variants=("into-pinned",), log=lambda _m: None)
    assert [r["name"] for r in rows] == ["gpu/unet_forward-tiny32-contiguous",
                                         "gpu/extract-into-pinned-tiny32-contiguous"]


def test_cpu_shard_buffers_are_views_of_one_block_in_the_store_layout():
    ext = FeatureExtractor(get_preset("tiny32").build(), GaussianDiffusion.from_name("linear", 1000),
                           [10], [0, 2], model_id="t")
    shapes = ext.shapes()
    bufs = ext.shard_buffers(shapes, 3)
    for i, (name, shape) in enumerate(shapes.items()):
        assert bufs[name].shape == (3, *shape) and bufs[name].dtype == np.float16
        bufs[name][...] = i
    block = bufs[next(iter(shapes))].base
    sizes = [int(np.prod(s)) for s in shapes.values()]
    assert block.shape == (3, sum(sizes)) and block.flags.c_contiguous
    # image j's row: each map in turn, in the order of shapes
    assert (block == np.repeat(np.arange(len(sizes)), sizes)[None].astype(np.float16)).all()


def test_runner_keeps_gpu_benchmarks_out_of_cpu_runs(tmp_path, monkeypatch):
    called = []
    fake = {name: (lambda device, name=name: called.append(name) or []) for name in runner.BENCHMARKS}
    monkeypatch.setattr(runner, "BENCHMARKS", fake)
    with pytest.raises(SystemExit, match=r"\['gpu'\] need --device cuda"):
        runner.run(["gpu"], "cpu", tmp_path / "b.parquet")
    assert called == []
    runner.run(None, "cpu", tmp_path / "b.parquet")
    assert "gpu" not in called and set(called) == set(fake) - runner.GPU_ONLY


def test_runner_says_so_when_cuda_is_missing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device is available"):
        runner.run(["gpu"], "cuda", tmp_path / "b.parquet")
    assert not (tmp_path / "b.parquet").exists()


def test_profile_unet_reports_the_variants_and_their_differences(monkeypatch):
    from benchmarks import profile_unet

    calls = []
    sdpa = profile_unet._sdpa_attend
    monkeypatch.setattr(profile_unet, "_sdpa_attend", lambda *a: calls.append(1) or sdpa(*a))
    res = profile_unet.run("tiny32", batch=2, device="cpu", top=3, channels_last=False)
    assert calls  # the SDPA variants did run through it
    assert res["memory_format"] == "contiguous" and "aten::" in res["profile_table"]
    assert set(res["timings"]) == {"default", "cudnn_benchmark", "sdpa", "both"}
    for name, r in res["timings"].items():
        assert r["images_per_s"] == pytest.approx(2 / r["seconds"])
        # the same model and input: cuDNN's flag changes nothing on the CPU, and SDPA computes
        # the same attention up to float32 rounding
        assert r["rel_rms_diff_vs_default"] < (1e-5 if "sdpa" in name or name == "both" else 1e-12), name
    # the patch is undone afterwards
    from ddps_core.diffusion import unet

    assert unet._attend is not profile_unet._sdpa_attend
