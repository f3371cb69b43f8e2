"""Reading native maps a run of images at a time gives the per-image maps, and the
labelling path that uses it predicts what the per-image path predicts."""

from __future__ import annotations

import numpy as np
import torch

from ddps_core.features.store import FeatureStore
from ddps_core.teacher import predict
from ddps_core.teacher.ensemble import PixelEnsemble

SHAPES = {"t10_b0": (3, 4, 4), "t10_b1": (2, 8, 8)}


def _store(tmp_path, n=11):
    st = FeatureStore.create(tmp_path / "s.zarr", model_id="m", steps=[10], blocks=[0, 1], image_size=8,
                             image_ids=[f"i{k}" for k in range(n)], shapes=SHAPES, shard_images=4)
    rng = np.random.default_rng(0)
    for k in range(st.num_shards):
        a, b = st.shard_range(k)
        st.write_shard(k, {nm: rng.standard_normal((b - a, *s)).astype(np.float16) for nm, s in SHAPES.items()})
    return FeatureStore.open(tmp_path / "s.zarr", read_only=True)


def test_natives_equal_native_for_runs_across_shards_and_out_of_order(tmp_path):
    st = _store(tmp_path)
    order = [2, 3, 4, 5, 9, 0, 1, 10, 10, 7]
    got = st.natives(order)
    assert len(got) == len(order)
    for i, maps in zip(order, got):
        want = st.native(i)
        assert set(maps) == set(want)
        for name in want:
            assert maps[name].dtype == np.float32
            np.testing.assert_array_equal(maps[name], want[name])
    assert st.native_bytes == 4 * (3 * 16 + 2 * 64)


def test_predict_store_reads_ahead_and_predicts_as_image_by_image(tmp_path, monkeypatch):
    st = _store(tmp_path)
    torch.manual_seed(0)
    ens = PixelEnsemble(feature_dim=5, num_classes=3, members=2)
    ens.eval()
    fast = list(predict.predict_store(ens, st))

    class PerImage:  # the same store without the batched read
        def __init__(self, store):
            self._s = store

        def __getattr__(self, name):
            if name == "natives":
                raise AttributeError(name)
            return getattr(self._s, name)

        def __len__(self):
            return len(self._s)

    calls = []
    orig = FeatureStore.natives
    monkeypatch.setattr(FeatureStore, "natives", lambda self, idx: calls.append(list(idx)) or orig(self, idx))
    monkeypatch.setattr(predict, "PREFETCH_BYTES", 3 * st.native_bytes)  # runs of 3 images
    batched = list(predict.predict_store(ens, st, image_indices=list(range(len(st)))))
    slow = list(predict.predict_store(ens, PerImage(st)))
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    for a, b, c in zip(fast, batched, slow):
        assert a[0] == b[0] == c[0]
        np.testing.assert_array_equal(a[1], c[1])
        np.testing.assert_array_equal(b[1], c[1])
        np.testing.assert_allclose(a[2], c[2])
        assert a[3] == c[3]
