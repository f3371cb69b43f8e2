"""The extract stage: library path, 2-writer Prefect flow (identical bytes), on_change policy."""

import numpy as np
import pytest

from ddps_core.config import parse_settings
from ddps_core.errors import ConfigError
from ddps_core.features.stage import prepare_store, run_stage, store_path
from ddps_core.features.store import FeatureStore

from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny dataset and a random small32 checkpoint adopted as the stage's DDPM."""
    root = tmp_path_factory.mktemp("proj")
    raw = tiny_project(root, {"n_unlabeled": 2, "n_labeled": 5, "n_test": 3},
                       features={"steps": [10, 100], "blocks": [1, 2, 3], "shard_images": 2, "batch_size": 2})
    return root, raw


def _settings(raw, **features):
    raw = {**raw, "features": {**raw["features"], **features}}
    return parse_settings(raw)


def _arrays(path):
    store = FeatureStore.open(path)
    return {n: np.stack([store.native(i)[n] for i in range(len(store))]) for n in store.names}, store


def test_library_path_fills_every_split(project, tmp_path):
    root, raw = project
    s = _settings(raw, out=str(tmp_path / "lib"))
    calls = []
    summary = run_stage(s, progress=lambda *a: calls.append(a))
    # the pool is extracted for the trained model only; the baseline needs the labelled splits
    assert set(summary) == {"train", "test", "unlabeled", "random_unet/train", "random_unet/test"}
    assert summary["train"]["n_done"] == 5 and summary["test"]["n_done"] == 3
    # the baseline: the same path with a randomly initialised UNet of the same preset
    rand = FeatureStore.open(store_path(s, "train", "random_unet"))
    ddpm = FeatureStore.open(store_path(s, "train"))
    assert rand.settings()["model_id"].startswith("random-")
    assert rand.names == ddpm.names and not np.array_equal(rand.native(0)["t10_b1"], ddpm.native(0)["t10_b1"])
    arrays, store = _arrays(store_path(s, "train"))
    assert store.names == ["t10_b1", "t10_b2", "t10_b3", "t100_b1", "t100_b2", "t100_b3"]
    assert store.label(0).max() < 7 and all(np.isfinite(a).all() for a in arrays.values())
    assert calls[-1][1:] == (3, 3)
    # a finished store rerun writes nothing
    again = run_stage(s)
    assert again["train"]["images_written"] == 0


def test_two_writer_flow_equals_library_path(project, tmp_path, prefect_harness):
    from flows.extract_features import extract_features_flow

    root, raw = project
    lib = _settings(raw, out=str(tmp_path / "lib"), random_unet=False)
    run_stage(lib)
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(raw))
    summary = extract_features_flow(features={"out": str(tmp_path / "flow"), "workers": 2,
                                              "random_unet": False}, params_path=str(params))
    assert summary["train"]["images_written"] == 5
    for split in ("train", "test"):
        a, _ = _arrays(store_path(lib, split))
        b, store = _arrays(tmp_path / "flow" / f"{split}.zarr")
        assert store.is_complete()
        assert all(np.array_equal(a[n], b[n]) for n in a)


def test_other_settings_rebuild_or_error(project, tmp_path):
    root, raw = project
    s = _settings(raw, out=str(tmp_path / "x"), random_unet=False)
    run_stage(s)
    with pytest.raises(ConfigError, match="steps"):
        prepare_store(_settings(raw, out=str(tmp_path / "x"), steps=[20], on_change="error"), "train")
    logs = []
    groups = prepare_store(_settings(raw, out=str(tmp_path / "x"), steps=[20]), "train", log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert sorted(k for g in groups for k in g) == [0, 1, 2]  # every shard to do again
    assert FeatureStore.open(store_path(s, "train")).settings()["steps"] == [20]


def test_workers_get_disjoint_shards(project, tmp_path):
    root, raw = project
    groups = prepare_store(_settings(raw, out=str(tmp_path / "w"), workers=2), "train")
    flat = [k for g in groups for k in g]
    assert sorted(flat) == [0, 1, 2] and len(flat) == len(set(flat)) and len(groups) == 2


def test_ensemble_stage_trains_labels_and_scores(project, tmp_path):
    """Teacher on ddpm features and the RGB+xy baseline: trained, labels written, and the
    stage's metrics equal `evaluate_dirs` on the written label PNGs (an independent path)."""
    import pandas as pd

    from ddps_core.metrics import evaluate_dirs
    from ddps_core.teacher.stage import label_split, train_method

    root, raw = project
    raw = {**raw, "features": {**raw["features"], "out": str(tmp_path / "f"), "random_unet": False},
           "teacher": {"members": 2, "max_epochs": 2, "batch_size": 64, "out": str(tmp_path / "ens")}}
    s = parse_settings(raw)
    run_stage(s)
    gt = tmp_path / "gt"
    gt.mkdir()
    store = FeatureStore.open(store_path(s, "test"))
    for i, image_id in enumerate(store.image_ids):
        np.save(gt / f"{image_id}.npy", store.label(i))
    for method in ("ddpm", "rgbxy"):
        record = train_method(s, method)
        assert record["epochs"] <= 2 and (tmp_path / "ens" / method / "ensemble.safetensors").is_file()
        result = label_split(s, method, "test", tmp_path / "labels")
        folder = tmp_path / "labels" / method / "test"
        scores = pd.read_parquet(folder / "scores.parquet")
        assert list(scores["image_id"]) == store.image_ids
        assert (scores["score"] >= 0).all() and {"pixels_0", "pixels_6"} <= set(scores.columns)
        pred = tmp_path / "pred" / method
        pred.mkdir(parents=True)
        for image_id in store.image_ids:
            (pred / f"{image_id}.png").write_bytes((folder / f"{image_id}.png").read_bytes())
        again = evaluate_dirs(pred, gt, 7)
        assert result.miou == pytest.approx(again.miou, nan_ok=True)
        assert result.mbiou == pytest.approx(again.mbiou, nan_ok=True)
