"""DDPM-Seg features: extractor vs. a hand-written UNet pass, the native-resolution store vs.
F.interpolate, reopening rules, the pixel sampler and the storage footprint."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddps_core.datasets import to_square
from ddps_core.diffusion import GaussianDiffusion, get_preset, load_unet, randomize_zero_init_
from ddps_core.errors import ConfigError, DataError
from ddps_core.features import (
    FeatureExtractor,
    FeatureStore,
    PixelSampler,
    extract_to_store,
    footprint,
    open_or_create,
    shard_ranges,
    shared_noise,
    upsample_pixels,
    valid_pixel_mask,
)

STEPS = [10, 50, 100]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """small32-spec with every weight random (zero-init layers too), as a bare state dict."""
    torch.manual_seed(1234)
    model = get_preset("small32-spec").build()
    randomize_zero_init_(model, torch.Generator().manual_seed(5))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    # one square image of the model size, one that to_square must resize and crop
    img0 = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img1 = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    lab0 = rng.integers(0, 4, (32, 32)).astype(np.uint8)
    lab1 = rng.integers(0, 4, (40, 56)).astype(np.uint8)
    return [(img0, lab0), (img1, lab1)]


# --------------------------------------------------------------------------------------------
# The independent reference: closed-form q_sample and a hand-written UNet loop
# --------------------------------------------------------------------------------------------


def _embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _expected_blocks(model, x: torch.Tensor, t: int) -> list[torch.Tensor]:
    """Outputs of every ``output_blocks[i]`` for the noised batch, computed by hand."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    eps = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    xt = (math.sqrt(abar[t]) * x.double() + math.sqrt(1.0 - abar[t]) * eps.double()).float()
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.no_grad():
        emb = model.time_embed(_embedding(tt, model.model_channels))
        h, skips = xt, []
        for block in model.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = model.middle_block(h, emb)
        outs = []
        for block in model.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            outs.append(h.float())
    return outs


def _to_x(pairs) -> torch.Tensor:
    xs = []
    for img, lab in pairs:
        sq, _ = to_square(img, lab, 32)
        xs.append(torch.from_numpy(sq.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(xs)


def test_extractor_and_store_match_hand_computed_features(checkpoint, images, tmp_path):
    model = load_unet(checkpoint, preset="small32-spec")
    diffusion = GaussianDiffusion.from_name("linear", 1000)
    fe = FeatureExtractor(model, diffusion, STEPS, None, noise_seed=0)
    n_blocks = len(model.output_blocks)
    assert fe.blocks == list(range(n_blocks))
    x = _to_x(images)
    expected = {t: _expected_blocks(model, x, t) for t in STEPS}

    got = fe(x)
    names = [f"t{t}_b{b}" for t in STEPS for b in range(n_blocks)]
    assert list(got) == names
    assert fe.shapes() == {f"t{t}_b{b}": tuple(expected[t][b].shape[1:]) for t in STEPS for b in range(n_blocks)}
    assert fe.feature_dim == sum(c for c, _, _ in fe.shapes().values())
    for t in STEPS:
        for b in range(n_blocks):
            g = got[f"t{t}_b{b}"]
            assert g.dtype == torch.float32 and g.device.type == "cpu"
            torch.testing.assert_close(g, expected[t][b], rtol=0, atol=1e-5)

    store = FeatureStore.create(
        tmp_path / "feat", image_ids=["a", "b"], shard_images=1, num_classes=4, ignore_index=255,
        **fe.store_settings(),
    )
    counts = extract_to_store(images, fe, store, batch_size=1)
    assert counts["images_written"] == 2 and store.is_complete()
    for i in range(2):
        ref = torch.cat(
            [
                F.interpolate(expected[t][b][i : i + 1].half().float(), size=(32, 32), mode="bilinear", align_corners=False)[0]
                for t in STEPS
                for b in range(n_blocks)
            ]
        )
        feats = store.image_features(i)
        assert feats.shape == (fe.feature_dim, 32, 32) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-3, atol=1e-3)
        # the 4-tap pixel path gives the same values
        ys, xs = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
        px = store.pixels(i, ys.ravel(), xs.ravel())
        np.testing.assert_allclose(px, feats.reshape(fe.feature_dim, -1).T, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(store.label(i), to_square(*images[i], 32)[1])


def test_extractor_noise_blocks_and_early_stop(checkpoint):
    model = load_unet(checkpoint, preset="small32-spec")
    diffusion = GaussianDiffusion.from_name("linear", 1000)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(ConfigError, match=r"0\.\.3"):
        FeatureExtractor(model, diffusion, [10], [0, 4])
    with pytest.raises(ConfigError, match=r"0\.\.999"):
        FeatureExtractor(model, diffusion, [1000], [0])
    a = FeatureExtractor(model, diffusion, [50], [2, 1], noise_seed=0)
    assert a.blocks == [1, 2] and a.names == ["t50_b1", "t50_b2"]
    b = FeatureExtractor(model, diffusion, [50], [1, 2], noise=shared_noise(32, 0))
    c = FeatureExtractor(model, diffusion, [50], [1, 2], noise=torch.randn(1, 3, 32, 32))
    fa, fb, fc = a(x), b(x), c(x)
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert not torch.allclose(fa["t50_b2"], fc["t50_b2"])
    assert a.noise_id == b.noise_id != c.noise_id

    # blocks after the last hooked one and the `out` head never run
    calls = []
    hooks = [model.output_blocks[3].register_forward_hook(lambda *a: calls.append("b3")),
             model.out.register_forward_hook(lambda *a: calls.append("out"))]
    try:
        a(x)
        assert calls == []
        model(x, torch.tensor([5]))  # the model itself still runs fully
        assert calls == ["b3", "out"]
    finally:
        for h in hooks:
            h.remove()


# --------------------------------------------------------------------------------------------
# On-demand upsampling
# --------------------------------------------------------------------------------------------


def test_noise_device_model_on_a_cpu_model_is_the_cpu_noise(checkpoint, images, tmp_path):
    model = load_unet(checkpoint, preset="small32-spec")
    diffusion = GaussianDiffusion.from_name("linear", 1000)
    on_cpu = FeatureExtractor(model, diffusion, [50], [1, 2], noise_seed=3, noise_device="cpu")
    on_model = FeatureExtractor(model, diffusion, [50], [1, 2], noise_seed=3, noise_device="model")
    # the reference's draw written out: a generator on the model's device (here the CPU), seeded
    want = torch.randn(1, 3, 32, 32, generator=torch.Generator(device="cpu").manual_seed(3), device="cpu")
    assert torch.equal(on_cpu.noise, want) and torch.equal(on_model.noise, want)
    assert torch.equal(shared_noise(32, 3, "cpu"), want)
    assert on_cpu.noise_id == on_model.noise_id == hashlib.sha256(want.numpy().tobytes()).hexdigest()[:16]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    torch.testing.assert_close(on_cpu(x), on_model(x), rtol=0, atol=0)
    # one store serves both settings on a CPU machine
    settings = dict(image_ids=["a", "b"], shard_images=1, **on_cpu.store_settings())
    store = open_or_create(tmp_path / "feat", **settings)
    extract_to_store(images, on_cpu, store, batch_size=2)
    assert open_or_create(tmp_path / "feat", **{**settings, **on_model.store_settings()}).is_complete()
    # noise drawn on another device is tagged with it, and such a store is not reused
    # (a stand-in for a CUDA draw: only the recorded device differs)
    on_model.noise_drawn_on = "cuda"
    assert on_model.noise_id == on_cpu.noise_id + "@cuda"
    with pytest.raises(ConfigError, match="noise_id"):
        open_or_create(tmp_path / "feat", **{**settings, **on_model.store_settings()})
    with pytest.raises(ConfigError, match="noise_device"):
        FeatureExtractor(model, diffusion, [50], [1], noise_device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_device_model_on_cuda_is_the_reference_draw(checkpoint):
    model = load_unet(checkpoint, preset="small32-spec")
    fe = FeatureExtractor(model, GaussianDiffusion.from_name("linear", 1000), [50], [1], noise_seed=0,
                          device="cuda", noise_device="model")
    want = torch.randn(1, 3, 32, 32, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda").cpu()
    assert torch.equal(fe.noise, want) and not torch.equal(want, shared_noise(32, 0))
    assert fe.noise_id == hashlib.sha256(want.numpy().tobytes()).hexdigest()[:16] + "@cuda"


@pytest.mark.parametrize(("h", "w", "size"), [(7, 5, 32), (13, 13, 32), (3, 3, 17), (32, 32, 32), (40, 24, 32), (1, 2, 9)])
def test_upsample_pixels_matches_interpolate(h, w, size):
    rng = np.random.default_rng(h * 100 + w)
    native = rng.standard_normal((6, h, w)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(native)[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")  # every pixel, borders too
    got = upsample_pixels(native, size, ys.ravel(), xs.ravel())
    np.testing.assert_allclose(got, ref.numpy().reshape(6, -1).T, rtol=0, atol=1e-6)
    # an arbitrary subset, in arbitrary order, with repeats
    sel = rng.integers(0, size, (2, 50))
    got = upsample_pixels(native, size, sel[0], sel[1])
    np.testing.assert_allclose(got, ref.numpy()[:, sel[0], sel[1]].T, rtol=0, atol=1e-6)


def _fake_store(path: Path, shapes: dict, n: int, size: int, shard_images: int, labels=None, seed=0) -> FeatureStore:
    store = FeatureStore.create(
        path, model_id="fake", steps=sorted({int(k.split("_")[0][1:]) for k in shapes}),
        blocks=sorted({int(k.split("_b")[1]) for k in shapes}), image_size=size,
        image_ids=[f"img{i:03d}" for i in range(n)], shapes=shapes, shard_images=shard_images,
        num_classes=None if labels is None else 10, ignore_index=None if labels is None else 255,
    )
    rng = np.random.default_rng(seed)
    for k, a, b in shard_ranges(store):
        feats = {name: rng.standard_normal((b - a, *shp)).astype(np.float16) for name, shp in shapes.items()}
        store.write_shard(k, feats, None if labels is None else labels[a:b])
    return store


def test_store_pixels_and_image_features_non_power_of_two(tmp_path):
    shapes = {"t1_b0": (3, 7, 5), "t1_b1": (2, 13, 13), "t1_b2": (4, 3, 3), "t1_b3": (1, 17, 17)}
    store = _fake_store(tmp_path / "s", shapes, n=3, size=17, shard_images=2)
    assert store.feature_dim == 10 and len(store) == 3 and store.is_complete()
    for i in range(3):
        native = store.native(i)
        assert list(native) == list(shapes) and all(v.dtype == np.float32 for v in native.values())
        ref = torch.cat(
            [F.interpolate(torch.from_numpy(m)[None], size=(17, 17), mode="bilinear", align_corners=False)[0] for m in native.values()]
        ).numpy()
        np.testing.assert_array_equal(store.image_features(i), ref)
        ys, xs = np.meshgrid(np.arange(17), np.arange(17), indexing="ij")
        np.testing.assert_allclose(store.pixels(i, ys.ravel(), xs.ravel()), ref.reshape(10, -1).T, rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        store.pixels(0, [17], [0])
    with pytest.raises(IndexError):
        store.native(3)


# --------------------------------------------------------------------------------------------
# Reopening, no-op reruns, shards
# --------------------------------------------------------------------------------------------


def _mtimes(path: Path) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def test_reopen_rules_and_noop_rerun(checkpoint, images, tmp_path):
    model = load_unet(checkpoint, preset="small32-spec")
    fe = FeatureExtractor(model, GaussianDiffusion.from_name("linear", 1000), [10], [1, 3])
    ids = ["a", "b"]
    settings = dict(image_ids=ids, shard_images=1, num_classes=4, ignore_index=255, **fe.store_settings())
    path = tmp_path / "feat"
    store = open_or_create(path, **settings)
    extract_to_store(images, fe, store, batch_size=2)
    before = _mtimes(path)

    again = open_or_create(path, **settings)  # same settings: reopened
    counts = extract_to_store(images, fe, again, batch_size=2)
    assert counts == {"shards_written": 0, "shards_skipped": 2, "images_written": 0, "images_skipped": 2}
    assert _mtimes(path) == before

    for key, value in [("model_id", "0123456789abcdef"), ("shard_images", 2), ("image_ids", ["a", "c"]),
                       ("noise_seed", 1), ("ignore_index", 0)]:
        with pytest.raises(ConfigError, match=key) as err:
            open_or_create(path, **{**settings, key: value})
        assert str(path) in str(err.value) and repr(value if key != "image_ids" else ["a", "c"]) in str(err.value)
    other = FeatureExtractor(model, GaussianDiffusion.from_name("linear", 1000), [10], [1, 3], noise_seed=3)
    with pytest.raises(ConfigError, match="noise_seed"):
        extract_to_store(images, other, store)
    with pytest.raises(ConfigError, match="already exists"):
        FeatureStore.create(path, **settings)
    with pytest.raises(DataError, match="does not exist"):
        FeatureStore.open(tmp_path / "nothing")
    # wrong source: ids must match the store's image ids
    from ddps_core.datasets import Sample

    fresh = open_or_create(tmp_path / "feat2", **settings)
    with pytest.raises(DataError, match="'b'"):
        extract_to_store([Sample(images[0][0], images[0][1], "a"), Sample(images[1][0], images[1][1], "x")], fe, fresh)
    assert fresh.done_mask().tolist() == [True, False]  # shard 0 was finished before the bad id


def test_disjoint_shards_and_markers(tmp_path):
    shapes = {"t5_b0": (2, 4, 4)}
    store = FeatureStore.create(tmp_path / "s", model_id="m", steps=[5], blocks=[0], image_size=4,
                                image_ids=[str(i) for i in range(10)], shapes=shapes, shard_images=4)
    assert shard_ranges(store) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    store.write_shard(2, {"t5_b0": np.ones((2, 2, 4, 4))})
    other = FeatureStore.open(tmp_path / "s")  # a second worker's handle
    other.write_shard(0, {"t5_b0": np.zeros((4, 2, 4, 4))})
    assert store.done_mask().tolist() == [True] * 4 + [False] * 4 + [True] * 2
    assert not store.is_complete()
    # completion records: one file per shard, never shared between shards
    assert sorted(f for f in os.listdir(tmp_path / "s" / "done") if f != "zarr.json") == ["c.0.0", "c.2.0"]
    assert sorted(f for f in os.listdir(tmp_path / "s" / "features") if f != "zarr.json") == ["c.0.0", "c.2.0"]
    assert np.isnan(store.native(5)["t5_b0"]).all()  # not written: fill value
    with pytest.raises(ValueError, match="shape"):
        store.write_shard(1, {"t5_b0": np.ones((3, 2, 4, 4))})


# --------------------------------------------------------------------------------------------
# Pixel sampler
# --------------------------------------------------------------------------------------------


def _sampler_store(tmp_path: Path):
    S = 8
    labels = np.full((6, S, S), 255, dtype=np.uint8)
    labels[0, :4] = 1  # 32 px kept
    labels[0, 4:5, :4] = 2  # 4 px of class 2: dropped
    labels[1] = 3  # 64 px kept
    labels[1, 0, :] = 255  # minus 8 ignore px -> 56
    labels[2, :3] = 0  # 24 px kept
    labels[2, 3:, :] = 5  # 40 px kept
    labels[3, :2, :] = 4  # 16 px: dropped (< 20)
    labels[4, :, :] = 255  # all ignore
    labels[5, :, :3] = 6  # 24 kept
    labels[5, :, 3:] = 7  # 40 kept
    shapes = {"t1_b0": (3, 4, 4), "t1_b1": (2, 8, 8), "t2_b0": (3, 4, 4), "t2_b1": (2, 8, 8)}
    store = _fake_store(tmp_path / "s", shapes, n=6, size=S, shard_images=4, labels=labels, seed=3)
    return store, labels


def test_valid_pixel_mask_reference_rule():
    lab = np.zeros((10, 10), dtype=np.uint8)
    lab[:, :2] = 255
    lab[0, 2:5] = 3  # 3 px of class 3
    mask = valid_pixel_mask(lab, 255, 20)
    assert mask.sum() == 80 - 3 and not mask[0, 2:5].any() and not mask[:, :2].any()
    assert valid_pixel_mask(lab, 255, 1).sum() == 80


def test_pixel_sampler(tmp_path):
    store, labels = _sampler_store(tmp_path)
    s = PixelSampler(store, batch_size=16, buffer_images=2, seed=11)
    assert s.num_pixels() == 32 + 56 + 64 + 0 + 0 + 64 == 216
    assert len(s) == math.ceil(216 / 16)

    # every valid pixel exactly once per epoch (features identify a pixel; random data)
    expected = {}
    for i in range(6):
        ys, xs = np.nonzero(valid_pixel_mask(labels[i], 255, 20))
        for row, y, x in zip(store.pixels(i, ys, xs), ys, xs, strict=True):
            expected[row.tobytes()] = int(labels[i, y, x])
    assert len(expected) == 216

    def epoch_rows(batches):
        rows = [(f.numpy()[r].tobytes(), int(y[r])) for f, y in batches for r in range(len(y))]
        return rows

    e0 = list(s)
    sizes = [len(y) for _, y in e0]
    assert sizes == [16] * 13 + [8]
    assert all(f.dtype == torch.float32 and f.shape[1] == store.feature_dim for f, _ in e0)
    assert all(y.dtype == torch.int64 for _, y in e0)
    rows0 = epoch_rows(e0)
    assert len(rows0) == 216 and dict(rows0) == expected  # no duplicates, nothing missing
    assert not {y for _, y in rows0} & {2, 4, 255}

    e1 = list(s)  # next epoch: same pixels, new order
    rows1 = epoch_rows(e1)
    assert dict(rows1) == expected and [r for r, _ in rows1] != [r for r, _ in rows0]

    s2 = PixelSampler(store, batch_size=16, buffer_images=2, seed=11)
    for (f0, y0), (f2, y2) in zip(e0, list(s2), strict=True):  # same seed, same batches
        assert torch.equal(f0, f2) and torch.equal(y0, y2)
    s2.set_epoch(1)
    assert [r for r, _ in epoch_rows(list(s2))] == [r for r, _ in rows1]
    s3 = PixelSampler(store, batch_size=16, buffer_images=2, seed=12)
    assert [r for r, _ in epoch_rows(list(s3))] != [r for r, _ in rows0]

    # memory: buffered pixels bounded by one group (+ a partial batch carried over)
    assert s.peak_buffered_pixels <= 2 * 8 * 8 + 16
    assert s.peak_feature_rows <= s.block_rows + 16

    sub = PixelSampler(store, batch_size=10, buffer_images=1, seed=0, image_indices=[0, 3])
    assert sub.num_pixels() == 32 and sum(len(y) for _, y in sub) == 32
    no_labels = _fake_store(tmp_path / "nolab", {"t1_b0": (1, 2, 2)}, n=1, size=4, shard_images=1)
    with pytest.raises(DataError, match="no labels"):
        PixelSampler(no_labels)


# --------------------------------------------------------------------------------------------
# Footprint
# --------------------------------------------------------------------------------------------

SHAPES_256 = {
    f"t{t}_b{b}": shp
    for t in (50, 150, 250)
    for b, shp in zip((5, 6, 7, 8, 12), [(1024, 32, 32), (512, 32, 32), (512, 32, 32), (512, 64, 64), (256, 128, 128)], strict=True)
}


def test_footprint_256_config_and_default(tmp_path):
    fp = footprint(SHAPES_256, 256, n_images=50)
    assert fp["feature_dim"] == 8448
    assert fp["native_values_per_image"] == 25_165_824
    assert fp["native_float16_bytes_per_image"] == 50_331_648
    assert fp["upsampled_float32_bytes_per_image"] == 8448 * 256 * 256 * 4 == 2_214_592_512
    assert fp["ratio"] >= 40
    print(f"\n256 config: {fp['native_float16_bytes_per_image']} B/image native float16 vs "
          f"{fp['upsampled_float32_bytes_per_image']} B upsampled float32: ratio {fp['ratio']:.1f}")

    # the extractor's shapes for the official architecture, without weights (meta device)
    with torch.device("meta"):
        big = get_preset("adm-256-lsun", use_fp16=False).build()
    fe = FeatureExtractor(big, GaussianDiffusion.from_name("linear", 1000), [50, 150, 250], [5, 6, 7, 8, 12],
                          device="meta", model_id="meta")
    assert fe.shapes() == SHAPES_256 and fe.feature_dim == 8448

    # the project default: tiny32, all blocks, steps 10, 50, 100 -- a real (small) store
    torch.manual_seed(0)
    tiny = get_preset("tiny32").build()
    fe = FeatureExtractor(tiny, GaussianDiffusion.from_name("linear", 1000), STEPS, None)
    fp_tiny = footprint(fe.shapes(), 32)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    store = FeatureStore.create(tmp_path / "tiny", image_ids=list("abcd"), shard_images=4, **fe.store_settings())
    extract_to_store(imgs, fe, store, batch_size=4)
    info = store.info()
    assert info["n_done"] == 4 and info["feature_dim"] == fe.feature_dim == fp_tiny["feature_dim"]
    assert info["ratio_native"] == pytest.approx(fp_tiny["ratio"])
    assert info["bytes_per_image"] >= fp_tiny["native_float16_bytes_per_image"]
    assert 0.9 * fp_tiny["ratio"] <= info["ratio"] <= fp_tiny["ratio"]
    print(f"tiny32 all blocks, steps {STEPS}: D={fp_tiny['feature_dim']}, "
          f"{fp_tiny['native_float16_bytes_per_image']} B/image native, {info['bytes_per_image']:.0f} B/image on disk, "
          f"ratio {fp_tiny['ratio']:.2f} (on disk {info['ratio']:.2f})")
