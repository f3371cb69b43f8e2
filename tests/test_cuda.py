"""The CUDA paths: feature extraction (bf16 autocast, both memory layouts, the pinned shard buffers
and their side-stream copies) against the CPU, and every stage of a tiny pipeline in-process
on the GPU.

CI has no GPU, so the CUDA cases run only where one is present (on a lent device machine:
``python -m pytest tests/test_cuda.py``). The in-process pipeline also runs on the CPU (about
15 s), so the harness itself is checked in CI.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ddps_core.diffusion.gaussian import GaussianDiffusion
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion.unet import randomize_zero_init_
from ddps_core.features import FeatureExtractor, FeatureStore, extract_to_store, open_or_create

from tests.conftest import REPO

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS, BLOCKS = [10, 100], [1, 3, 5]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_preset("tiny32").build()
    randomize_zero_init_(model, torch.Generator().manual_seed(1))  # non-trivial output blocks
    return model.eval()


def _extractor(device: str) -> FeatureExtractor:
    return FeatureExtractor(_model(), GaussianDiffusion.from_name("linear", 1000), STEPS, BLOCKS,
                            device=device, model_id="t")


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_cuda
def test_cuda_float32_features_equal_the_cpu_s(monkeypatch):
    """The CUDA path (either layout, the hooks, the early stop, the copies) computes what the
    CPU computes: in float32 without TF32 the features agree to float32 rounding (on the
    H200: relative RMS errors of 1.9e-6 to 2.2e-6)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # convolutions
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # matrix products (the attention)
    try:
        _check_float32_features()
    finally:
        torch.set_float32_matmul_precision(precision)


def _check_float32_features() -> None:
    x = _images()
    cpu = _extractor("cpu")(x)
    for channels_last in (True, False):
        ext = FeatureExtractor(_model(), GaussianDiffusion.from_name("linear", 1000), STEPS, BLOCKS,
                               device="cuda", model_id="t", mixed_precision=False, channels_last=channels_last)
        gpu = ext(x)
        assert list(gpu) == list(cpu)
        for name in cpu:
            assert gpu[name].shape == cpu[name].shape and gpu[name].dtype == torch.float32
            assert _rel_rms(gpu[name], cpu[name]) < 1e-4, (channels_last, name, _rel_rms(gpu[name], cpu[name]))


@needs_cuda
def test_cuda_bf16_features_follow_the_cpu_s():
    """Under bf16 autocast (the default on CUDA) the features follow the float32 ones to bf16's
    8 significant bits compounded over the blocks: on the H200 the relative RMS errors of
    this random UNet's features were 2.0% to 2.35% in either layout."""
    x = _images()
    cpu, gpu = _extractor("cpu")(x), _extractor("cuda")(x)
    assert list(gpu) == list(cpu)
    for name in cpu:
        a, b = gpu[name], cpu[name]
        assert a.shape == b.shape and a.dtype == torch.float32 and a.device.type == "cpu"
        assert _rel_rms(a, b) < 5e-2, (name, _rel_rms(a, b))
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.995


@needs_cuda
def test_cuda_shard_buffers_are_pinned_contiguous_and_disjoint():
    ext = _extractor("cuda")
    shapes = ext.shapes()
    bufs = ext.shard_buffers(shapes, 5)
    assert list(bufs) == list(shapes)
    for i, (name, buf) in enumerate(bufs.items()):
        assert buf.shape == (5, *shapes[name]) and buf.dtype == np.float16
        assert buf.flags.c_contiguous
        assert torch.from_numpy(buf).is_pinned()
        buf[...] = i
    assert all((buf == i).all() for i, buf in enumerate(bufs.values()))  # no overlap


@needs_cuda
def test_cuda_pinned_and_pageable_copies_give_the_features_bytes():
    ext = _extractor("cuda")
    x = _images(6)
    shapes = ext.shapes()
    pinned = ext.shard_buffers(shapes, 6)
    pageable = {n: np.full((6, *s), np.nan, np.float16) for n, s in shapes.items()}
    for buffers in (pinned, pageable):
        ext.extract_into(x[:4], buffers, 0)  # two batches at offsets, as a shard is filled
        ext.extract_into(x[4:], buffers, 4)
    want = {n: f.to(torch.float16).numpy() for n, f in ext(x).items()}
    for name in shapes:
        assert np.array_equal(pinned[name], want[name]), name
        assert np.array_equal(pageable[name], want[name]), name


@needs_cuda
def test_cuda_store_holds_what_the_extractor_computes(tmp_path):
    ext = _extractor("cuda")
    x = _images(6)
    images = [((x[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for i in range(6)]
    store = open_or_create(tmp_path / "s.zarr", **ext.store_settings(), image_ids=[f"i{i}" for i in range(6)],
                           shard_images=4, num_classes=None, ignore_index=None)
    counts = extract_to_store(images, ext, store, batch_size=3)
    assert counts["images_written"] == 6
    store = FeatureStore.open(tmp_path / "s.zarr", read_only=True)
    assert store.is_complete()
    from ddps_core.features import preprocess

    xs = torch.stack([preprocess(im, 32) for im in images])
    for i in (0, 3, 5):  # both shards; batches of 3 inside shards of 4
        got = store.native(i)
        want = ext(xs[[i]])  # one image alone: batch-independent up to the GPU's rounding
        for name, f in want.items():
            a, b = got[name].astype(np.float32), f[0].numpy()
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max() + 1e-3, (i, name)


def _tiny_params(device: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["device"] = device
    params["data"]["synthetic"].update(n_unlabeled=32, n_labeled=4, n_test=4)
    params["ddpm"].update(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=3, sample_count=4,
                          sample_steps=5, log_every=1)
    params["features"].update(shard_images=4, batch_size=4, steps=[10, 50])
    params["teacher"].update(members=2, max_epochs=2)
    params["report"].update(overlays=2, refinement=2)
    params["generate"].update(filter="drop_both", drop_certain=4, contact_sheet=2)
    params["student"].update(epochs=2, batch_size=8, warmup_steps=2)
    params["refiner"].update(steps=6, single_step_steps=2, batch_size=4, warmup_steps=2, checkpoint_every=3,
                             log_every=1)
    return params


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_every_stage_runs_in_process_on_the_device(tmp_path, monkeypatch, device):
    """Every stage, in order, in this process, with the project's relative paths under
    ``tmp_path``."""
    from ddps_core import stages
    from ddps_core.config import parse_settings
    from ddps_core.diffusion.stage import load_trained

    monkeypatch.chdir(tmp_path)
    s = parse_settings(_tiny_params(device))
    out = {name: stages.get(name).run(s) for name in stages.ORDER}
    model, _ = load_trained(s.ddpm.out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert out["label"]["teacher/test"]["images"] == 4 and out["label"]["teacher/unlabeled"]["images"] == 32
    assert {r["method"] for r in out["refine"]["steps"]} >= {"student", "refiner"}
    assert set(out["evaluate"]) >= {"teacher", "random_unet", "rgbxy", "student"}
    for name in ("evaluate", "refine"):
        frame = pd.read_parquet(tmp_path / "reports" / f"{name}.parquet")
        miou = pd.to_numeric(frame["miou"], errors="coerce").dropna()
        assert len(miou) and ((miou >= 0) & (miou <= 1)).all()
