"""Stages train_teacher and label: the teacher and a baseline trained, their labels written
and equal, once scored, to an independent scoring of the PNGs; labelling resumes by part;
disjoint groups of parts equal one run."""

import numpy as np
import pandas as pd
import pytest

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.features.stage import store_path
from ddps_core.datasets import DDPMSegFolder
from ddps_core.features.store import FeatureStore
from ddps_core.inference import load_predictor
from ddps_core.metrics.files import load_label_map
from ddps_core.metrics import evaluate_dirs
from ddps_core.progress import Reporter
from ddps_core.teacher import labels as labelling
from ddps_core.teacher.stage import label_group, plan_labels
from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    raw = tiny_project(
        root, {"n_unlabeled": 12, "n_labeled": 5, "n_test": 3},
        features={"steps": [10], "blocks": [1, 2], "shard_images": 4, "batch_size": 4, "out": str(root / "f")},
        teacher={"baselines": ["rgbxy"], "members": 2, "max_epochs": 2, "out": str(root / "teacher"),
                 "baselines_out": str(root / "baselines"), "labels_out": str(root / "labels"),
                 "min_class_pixels": 1})
    s = parse_settings(raw)
    stages.get("extract").run(s)
    return root, raw


def test_streaming_labels_equal_labels_from_stored_features(project, tmp_path):
    """Stage label streams (no store): its test labels and scores equal the ensemble's on the
    features the extract stage stores for the same images (float16 both ways)."""
    from ddps_core.teacher.predict import predict_store
    from ddps_core.teacher.stage import load_method

    root, raw = project
    s = parse_settings(raw)
    stages.get("train_teacher").run(s)
    stages.get("label").run(s)
    stored = parse_settings({**raw, "features": {**raw["features"], "splits": ["test"], "out": str(tmp_path / "f")}})
    stages.get("extract").run(stored)
    store = FeatureStore.open(store_path(stored, "test"), read_only=True)
    folder = root / "labels" / "teacher" / "test"
    scores = pd.read_parquet(folder / "scores.parquet").set_index("image_id")["score"]
    agree = []
    for image_id, labels, _, score in predict_store(load_method(s, "teacher"), store):
        streamed = load_label_map(folder / f"{image_id}.png")
        agree.append(float((streamed == labels).mean()))
        assert scores[image_id] == pytest.approx(score, rel=1e-3, abs=1e-6)
    assert len(agree) == 3 and min(agree) >= 0.999, agree


def test_teacher_and_baseline_train_label_and_score_like_an_independent_scoring(project, tmp_path):
    root, raw = project
    s = parse_settings(raw)
    summary = stages.get("train_teacher").run(s)
    assert set(summary) == {"teacher", "rgbxy"} and all(r["epochs"] <= 2 for r in summary.values())
    assert (root / "teacher" / "ensemble.safetensors").is_file()
    assert (root / "baselines" / "rgbxy" / "ensemble.safetensors").is_file()
    done = stages.get("label").run(s)
    assert set(done) == {"teacher/test", "rgbxy/test", "teacher/unlabeled"}
    assert done["teacher/unlabeled"]["images"] == 12
    test = DDPMSegFolder(s.data.out, "test")
    gt = tmp_path / "gt"
    gt.mkdir()
    for sample in test:
        np.save(gt / f"{sample.id}.npy", sample.label)
    settings = parse_settings({**raw, "evaluate": {"student": False, "reports": str(tmp_path / "reports")},
                               "report": {"overlays": 1}})
    report = stages.get("evaluate").run(settings)
    stages.get("report").run(settings)
    for method in ("teacher", "rgbxy"):
        folder = root / "labels" / method / "test"
        scores = pd.read_parquet(folder / "scores.parquet")
        assert list(scores["image_id"]) == test.ids
        assert (scores["score"] >= 0).all() and {"pixels_0", "pixels_6"} <= set(scores.columns)
        assert not (folder / ".parts").exists()
        # stage evaluate's figures equal an independent scoring of the label PNGs
        pred = tmp_path / "pred" / method
        pred.mkdir(parents=True)
        for image_id in test.ids:
            (pred / f"{image_id}.png").write_bytes((folder / f"{image_id}.png").read_bytes())
        again = evaluate_dirs(pred, gt, 7)
        assert report[method]["miou"] == pytest.approx(100 * again.miou, abs=1e-4, nan_ok=True)
        assert report[method]["mbiou"] == pytest.approx(100 * again.mbiou, abs=1e-4, nan_ok=True)
        assert (tmp_path / "reports" / "figures" / "overlays" / f"{method}_{test.ids[0]}.png").is_file()


def test_labelling_in_disjoint_groups_equals_one_run(project, tmp_path, monkeypatch):
    root, raw = project
    s = parse_settings(raw)
    stages.get("train_teacher").run(s)
    monkeypatch.setattr(labelling, "PART_IMAGES", 4)  # 12 pool images: 3 parts
    one = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "one")}})
    many = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "many")}})
    stages.get("label").run(one)
    groups = plan_labels(many, 2, Reporter())
    pool = [g["parts"] for g in groups if g["split"] == "unlabeled"]
    assert pool == [[0, 2], [1]]  # disjoint, every part once
    for g in reversed(groups):  # in any order
        label_group(many, g, Reporter())
    assert plan_labels(many, 2, Reporter()) == []  # nothing left to do
    stages.get("label").main(many, Reporter())
    assert plan_labels(many, 2, Reporter()) == []  # a finished labelling is kept, not labelled again
    for path in sorted((tmp_path / "one").rglob("*")):
        if path.is_file():
            twin = tmp_path / "many" / path.relative_to(tmp_path / "one")
            assert twin.read_bytes() == path.read_bytes(), path


def test_labelling_resumes_by_part_to_the_same_files(project, tmp_path, monkeypatch):
    """A labelling killed after its first part redoes only the parts after it and ends with
    the same PNGs and scores as an uninterrupted run; parts of another teacher are redone."""
    root, raw = project
    s = parse_settings(raw)
    stages.get("train_teacher").run(s)
    monkeypatch.setattr(labelling, "PART_IMAGES", 4)  # 12 pool images: 3 parts
    predicted = []

    class Counting:
        """The teacher, noting which pool images it is asked to predict."""

        def __init__(self, inner):
            self.inner, self.num_classes = inner, inner.num_classes
            self.uncertainty_max, self.batch = inner.uncertainty_max, inner.batch

        def __call__(self, images):
            predicted.extend(index[id(x)] for x in images)
            return self.inner(images)

    pool = labelling.ReaderImages(DDPMSegFolder(s.data.out, "unlabeled"))
    cached = [pool.image(i) for i in range(len(pool))]
    index = {id(x): i for i, x in enumerate(cached)}
    pool.image = cached.__getitem__
    ens, store = Counting(load_predictor(s, "teacher")), pool
    full = labelling.label_images(ens, store, tmp_path / "a", "unlabeled", "t1")
    predicted.clear()

    class Killed(Exception):
        pass

    def kill_at_6(i, _labels):
        if i == 6:
            raise Killed

    with pytest.raises(Killed):
        labelling.label_images(ens, store, tmp_path / "b", "unlabeled", "t1", on_image=kill_at_6)
    assert sorted(p.name for p in (tmp_path / "b" / ".parts").glob("part-*")) == ["part-00000.parquet"]
    predicted.clear()
    again = labelling.label_images(ens, store, tmp_path / "b", "unlabeled", "t1")
    assert predicted == list(range(4, 12))  # the finished part is not redone
    pd.testing.assert_frame_equal(again, full)
    for name in (p.name for p in (tmp_path / "a").glob("*.png")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "b" / ".parts").exists()
    with pytest.raises(Killed):
        labelling.label_images(ens, store, tmp_path / "c", "unlabeled", "t1", on_image=kill_at_6)
    predicted.clear()
    labelling.label_images(ens, store, tmp_path / "c", "unlabeled", "t2")
    assert predicted == list(range(12))


def test_labels_changed_under_the_same_names_train_the_teacher_again(tmp_path):
    """Reuse is decided by the features' content: the same image names with other labels
    are a new run (its checkpoint is not resumed), and the pool's labelling is redone."""
    raw = tiny_project(
        tmp_path, {"n_unlabeled": 2, "n_labeled": 3, "n_test": 1},
        features={"steps": [10], "blocks": [1], "shard_images": 2, "batch_size": 2, "out": str(tmp_path / "f")},
        teacher={"baselines": [], "members": 1, "max_epochs": 1, "out": str(tmp_path / "teacher"),
                 "labels_out": str(tmp_path / "labels"), "min_class_pixels": 1, "checkpoint_every": 1})
    s = parse_settings(raw)
    stages.get("extract").run(s)
    first = stages.get("train_teacher").run(s)["teacher"]
    stages.get("label").run(s)
    again = stages.get("train_teacher").run(s)["teacher"]
    assert again["resumed_from"] is not None  # same content: the finished run is reused
    npy = sorted((tmp_path / "dataset" / "real" / "train").glob("*.npy"))[0]
    np.save(npy, (np.load(npy) + 1) % 7)
    stages.get("extract").run(s)
    other = stages.get("train_teacher").run(s)["teacher"]
    assert other["resumed_from"] is None and first["resumed_from"] is None
    assert plan_labels(s, 1, Reporter()) != []  # the pool is labelled again by the new teacher


def test_label_removes_what_the_settings_no_longer_label(project, tmp_path):
    """``data/labels`` is a persistent DVC output relabelled in place: a baseline dropped from
    teacher.baselines takes its folder with it, and an image no longer in a split its files."""
    root, raw = project
    s = parse_settings(raw)
    stages.get("train_teacher").run(s)
    stages.get("label").run(s)
    stale = root / "labels" / "teacher" / "test"
    (stale / "test_9999.png").write_bytes(b"")
    (stale / "test_9999_uncertainty.png").write_bytes(b"")
    foreign = root / "labels" / "notes"
    foreign.mkdir(exist_ok=True)
    (foreign / "mine.txt").write_text("kept: not made by the stage")
    without = parse_settings({**raw, "teacher": {**raw["teacher"], "baselines": []}})
    stages.get("label").run(without)
    assert not (root / "labels" / "rgbxy").exists()
    assert not (stale / "test_9999.png").exists() and not (stale / "test_9999_uncertainty.png").exists()
    assert (stale / "scores.parquet").is_file() and len(list(stale.glob("*_uncertainty.png"))) == 3
    assert (foreign / "mine.txt").read_text() == "kept: not made by the stage"


def test_without_the_pool_its_labels_folder_says_why(project, tmp_path):
    """generate.source generated: the pool is not labelled; its folder (a DVC dependency of
    stage generate) holds one line saying so, and a labelled pool of an earlier run is gone."""
    from ddps_core.teacher.stage import NO_POOL

    root, raw = project
    s = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "labels")}})
    stages.get("train_teacher").run(s)
    stages.get("label").run(s)
    pool = tmp_path / "labels" / "teacher" / "unlabeled"
    assert (pool / "scores.parquet").is_file() and not (pool / NO_POOL).exists()
    generated = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "labels")},
                                "generate": {"source": "generated"}})
    assert set(stages.get("label").run(generated)) == {"teacher/test", "rgbxy/test"}
    assert sorted(p.name for p in pool.iterdir()) == [NO_POOL]
    assert "generate.source is 'generated'" in (pool / NO_POOL).read_text()
