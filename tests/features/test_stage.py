"""Stage extract: every split's store, the random-UNet baseline's, a rerun that writes
nothing, the settings-change policy, and disjoint shard groups for concurrent writers."""

import numpy as np
import pytest

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.errors import ConfigError
from ddps_core.features.stage import plan_shards, store_path
from ddps_core.features.store import FeatureStore
from ddps_core.progress import CallbackReporter, Reporter
from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny dataset and a random small32 checkpoint adopted as the stage's DDPM."""
    root = tmp_path_factory.mktemp("proj")
    raw = tiny_project(root, {"n_unlabeled": 2, "n_labeled": 5, "n_test": 3},
                       features={"steps": [10, 100], "blocks": [1, 2, 3], "shard_images": 2, "batch_size": 2})
    return root, raw


def settings(raw, baselines=("random_unet", "rgbxy"), **features):
    return parse_settings({**raw, "features": {**raw["features"], **features},
                           "teacher": {**raw.get("teacher", {}), "baselines": list(baselines)}})


def arrays(path):
    store = FeatureStore.open(path)
    return {n: np.stack([store.native(i)[n] for i in range(len(store))]) for n in store.names}, store


def test_extract_fills_every_split_and_the_baseline_stores(project, tmp_path):
    root, raw = project
    assert settings(raw).features.splits == ["train"]  # by default: what the teacher learns from
    s = settings(raw, out=str(tmp_path / "lib"), splits=["train", "test", "unlabeled"])
    calls = []
    summary = stages.get("extract").run(s, CallbackReporter(progress=lambda *a, **_: calls.append(a)))
    # the pool is extracted for the trained model only; the baseline needs the labelled splits
    assert set(summary) == {"train", "test", "unlabeled", "random_unet/train", "random_unet/test"}
    assert summary["train"]["n_done"] == 5 and summary["test"]["n_done"] == 3
    # the baseline: the same path with a randomly initialised UNet of the same preset
    rand = FeatureStore.open(store_path(s, "train", "random_unet"))
    ddpm = FeatureStore.open(store_path(s, "train"))
    assert rand.settings()["model_id"].startswith("random-")
    assert rand.names == ddpm.names and not np.array_equal(rand.native(0)["t10_b1"], ddpm.native(0)["t10_b1"])
    got, store = arrays(store_path(s, "train"))
    assert store.names == ["t10_b1", "t10_b2", "t10_b3", "t100_b1", "t100_b2", "t100_b3"]
    assert store.label(0).max() < 7 and all(np.isfinite(a).all() for a in got.values())
    assert ("extract test", 3, 3) in calls  # progress counts the store's done images
    # the run is over: no store's writer lock is held (another run may write them now)
    assert all(FeatureStore.open(store_path(s, sp, v)).lock_holder() is None
               for v, sp in [("ddpm", "train"), ("ddpm", "test"), ("ddpm", "unlabeled"), ("random_unet", "train")])
    # a finished store: nothing left to plan, nothing written again
    def data_files():  # the writer lock is taken and given back by every run
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "lib").rglob("*") if p.is_file() and p.name != "writer.lock"}

    mtimes = data_files()
    assert plan_shards(s, 1, Reporter()) == []
    stages.get("extract").run(s)
    assert data_files() == mtimes


def test_without_the_random_unet_baseline_only_the_trained_model_is_extracted(project, tmp_path):
    root, raw = project
    summary = stages.get("extract").run(settings(raw, baselines=["rgbxy"], out=str(tmp_path / "f"),
                                                 splits=["train", "test", "unlabeled"]))
    assert set(summary) == {"train", "test", "unlabeled"}


def test_other_settings_rebuild_or_error(project, tmp_path):
    root, raw = project
    s = settings(raw, baselines=[], out=str(tmp_path / "x"))
    stages.get("extract").run(s)
    with pytest.raises(ConfigError, match="steps"):
        plan_shards(settings(raw, baselines=[], out=str(tmp_path / "x"), steps=[20], on_change="error"), 1, Reporter())
    logs = []
    groups = plan_shards(settings(raw, baselines=[], out=str(tmp_path / "x"), steps=[20]), 1,
                         CallbackReporter(log=logs.append))
    assert any("rebuilding" in m for m in logs)
    train = [g for g in groups if g["split"] == "train"]
    assert sorted(k for g in train for k in g["shards"]) == [0, 1, 2]  # every shard to do again
    assert FeatureStore.open(store_path(s, "train")).settings()["steps"] == [20]


def test_writers_get_disjoint_shards(project, tmp_path):
    root, raw = project
    groups = plan_shards(settings(raw, baselines=[], out=str(tmp_path / "w")), 2, Reporter())
    train = [g["shards"] for g in groups if g["split"] == "train"]
    flat = [k for g in train for k in g]
    assert sorted(flat) == [0, 1, 2] and len(flat) == len(set(flat)) and len(train) == 2
    # the groups carry the run's writer-lock token: a writer in another process joins the run
    tokens = {g["token"] for g in groups if g["split"] == "train"}
    lock = (tmp_path / "w" / "train.zarr" / "writer.lock").read_text()
    assert len(tokens) == 1 and next(iter(tokens)) in lock


def test_images_or_labels_changed_under_the_same_names_are_extracted_again(tmp_path):
    raw = tiny_project(tmp_path, {"n_unlabeled": 0, "n_labeled": 4, "n_test": 1},
                       features={"steps": [10], "blocks": [1], "shard_images": 2, "batch_size": 2,
                                 "out": str(tmp_path / "f"), "splits": ["train"]},
                       teacher={"baselines": []})
    s = parse_settings(raw)
    stages.get("extract").run(s)
    store = FeatureStore.open(store_path(s, "train"), read_only=True)
    before, first_label = store.content_id(), store.label(0).copy()
    assert plan_shards(s, 1, Reporter()) == []  # unchanged inputs (the files merely touched): nothing to do
    # one label file, same name, other classes
    npy = sorted((tmp_path / "dataset" / "real" / "train").glob("*.npy"))[0]
    mask = np.load(npy)
    np.save(npy, (mask + 1) % 7)
    logs = []
    groups = plan_shards(s, 1, CallbackReporter(log=logs.append))
    assert any("inputs_id" in m and "rebuilding" in m for m in logs)
    assert sorted(k for g in groups for k in g["shards"]) == [0, 1]
    stages.get("extract").run(s)
    after = FeatureStore.open(store_path(s, "train"), read_only=True)
    assert after.content_id() != before
    assert not np.array_equal(after.label(0), first_label)


def test_content_id_follows_the_values_not_the_files_times(tmp_path):
    shapes = {"t3_b0": (2, 4, 4)}
    ids = []
    for name in ("a", "b"):
        store = FeatureStore.create(tmp_path / name, model_id="m", steps=[3], blocks=[0], image_size=8,
                                    shapes=shapes, image_ids=["x", "y"], shard_images=2)
        ids.append(store.content_id())  # nothing written: equal
        store.write_shard(0, {"t3_b0": np.full((2, 2, 4, 4), 1 if name == "a" else 2, np.float16)})
        ids.append(store.content_id())
        store.release()
    assert ids[0] == ids[2] and ids[1] != ids[3] and ids[0] != ids[1]
    again = FeatureStore.open(tmp_path / "a")
    again.write_shard(0, {"t3_b0": np.full((2, 2, 4, 4), 1, np.float16)})  # the same values again
    assert again.content_id() == ids[1]
