"""The generate and train_student stages on a tiny project: both sources, per-source
filtering with the expected counts, a rerun that reuses the samples, a stale pool refused,
and the student scored in the same report as the teacher."""

import json

import numpy as np
import pandas as pd
import pytest

from ddps_core.config import parse_settings
from ddps_core.datasets import GenericFolder
from ddps_core.errors import DataError
from ddps_core.features.stage import run_stage as extract
from ddps_core.generate.stage import run_stage as generate
from ddps_core.metrics import ConfusionAccumulator
from ddps_core.metrics.files import load_label_map
from ddps_core.teacher.stage import label_split, run_evaluate, train_method

from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    raw = tiny_project(
        root, {"n_unlabeled": 12, "n_labeled": 4, "n_test": 3},
        features={"steps": [10], "blocks": [1, 2], "shard_images": 4, "batch_size": 4,
                  "out": str(root / "features"), "random_unet": False},
        teacher={"methods": ["ddpm"], "members": 2, "max_epochs": 1, "out": str(root / "ens"),
                  "labels_out": str(root / "labels"), "min_class_pixels": 1, "figures": 1},
        generate={"source": "both", "n_samples": 5, "sample_steps": 2, "batch_size": 2,
                  "drop_certain": 2, "drop_uncertain": 0.2, "out": str(root / "generated"),
                  "work": str(root / "work"), "contact_sheet": 2},
        student={"epochs": 1, "batch_size": 4, "warmup_steps": 0, "out": str(root / "student")})
    s = parse_settings(raw)
    extract(s)
    train_method(s, "ddpm")
    for split in ("test", "unlabeled"):
        label_split(s, "ddpm", split, s.teacher.labels_out)
    return root, raw


def test_generate_both_sources_filters_each_and_reruns_cheaply(project):
    root, raw = project
    s = parse_settings(raw)
    stats = generate(s)
    # pool: 12 - 2 most certain - ceil(0.2 * 12) = 3 most uncertain; generated: 5 - 2 - 1
    assert stats["pool"]["kept"] == 7 and stats["pool"]["dropped"] == {"most_certain": 2, "most_uncertain": 3}
    assert stats["generated"]["kept"] == 2 and stats["generated"]["dropped"] == {"most_certain": 2, "most_uncertain": 1}
    assert stats["real"]["kept"] == 4 and stats["total_kept"] == 13
    manifest = pd.read_parquet(root / "generated" / "manifest.parquet")
    reader = GenericFolder(root / "generated")
    assert sorted(reader.ids) == sorted(manifest.loc[manifest["kept"], "image_id"])
    gen = manifest[manifest["source"] == "generated"]
    assert list(gen["sampler_steps"].unique()) == [2] and gen["teacher"].nunique() == 1
    # the pool's scores are the label stage's
    pool_scores = pd.read_parquet(root / "labels" / "ddpm" / "unlabeled" / "scores.parquet")
    pool = manifest[manifest["source"] == "pool"].set_index("source_id")["score"]
    assert np.allclose(pool.loc[pool_scores["image_id"]].to_numpy(), pool_scores["score"].to_numpy())
    # an exported generated mask is the teacher's label of that sample
    row = gen.iloc[0]
    assert np.array_equal(load_label_map(root / "generated" / row["mask"]),
                          load_label_map(root / "work" / "labels" / f"{row['image_id']}.png"))
    assert not (root / "work" / "features.zarr").exists()  # the scratch store is removed
    # a rerun with another filter reuses the samples and the labels (nothing re-sampled)
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / "work" / "samples" / "images").iterdir()}
    raw2 = {**raw, "generate": {**raw["generate"], "drop_certain": 0, "drop_uncertain": 0.0}}
    stats2 = generate(parse_settings(raw2))
    assert stats2["total_kept"] == 12 + 5 + 4
    assert {p.name: p.stat().st_mtime_ns for p in (root / "work" / "samples" / "images").iterdir()} == stamps
    generate(s)  # back to the first settings for the next test


def test_generate_refuses_a_pool_labelled_by_another_teacher(project, tmp_path):
    root, raw = project
    labels = tmp_path / "labels"
    import shutil

    shutil.copytree(root / "labels", labels)
    (labels / "ddpm" / "unlabeled" / "teacher.txt").write_text("0123456789abcdef")
    raw2 = {**raw, "teacher": {**raw["teacher"], "labels_out": str(labels)},
            "generate": {**raw["generate"], "source": "pool", "out": str(tmp_path / "g")}}
    with pytest.raises(DataError, match="another teacher"):
        generate(parse_settings(raw2))
    assert not (tmp_path / "g").exists()


def test_student_stage_is_scored_next_to_the_teacher(project, tmp_path):
    from ddps_core.student.stage import run_stage as train_student

    root, raw = project
    s = parse_settings(raw)
    info = train_student(s)
    assert info["n_train"] == 13 and info["best_epoch"] == 1
    pred = root / "student" / "test"
    assert len(list(pred.glob("*.png"))) == 3
    df = run_evaluate(s, report=tmp_path / "r.parquet", metrics=tmp_path / "m.json", figures=tmp_path / "fig")
    assert list(df["method"].unique()) == ["ddpm", "student"]
    # the report's student row equals an independent scoring of its PNGs
    from ddps_core.features.stage import store_path
    from ddps_core.features.store import FeatureStore

    truth = FeatureStore.open(store_path(s, "test"), read_only=True)
    acc = ConfusionAccumulator(7)
    for i, image_id in enumerate(truth.image_ids):
        acc.update(load_label_map(pred / f"{image_id}.png"), truth.label(i), image_id)
    summary = df[(df["method"] == "student") & (df["scope"] == "summary")].iloc[0]
    assert summary["miou"] == pytest.approx(acc.result().miou, nan_ok=True)
    assert summary["miou"] == pytest.approx(info["test_miou"], nan_ok=True)
    assert json.loads((tmp_path / "m.json").read_text())["student"]["miou"] == pytest.approx(summary["miou"], nan_ok=True)
    assert (tmp_path / "fig" / f"student_{truth.image_ids[0]}.png").is_file()


def test_labelling_resumes_by_part_to_the_same_files(project, tmp_path, monkeypatch):
    """A labelling killed after its first part redoes only the parts after it and ends with
    the same PNGs and scores as an uninterrupted run."""
    import ddps_core.teacher.stage as stage
    from ddps_core.features.stage import store_path
    from ddps_core.features.store import FeatureStore
    from ddps_core.teacher.stage import label_images, load_method

    root, raw = project
    s = parse_settings(raw)
    monkeypatch.setattr(stage, "PART_IMAGES", 4)  # 12 pool images: 3 parts
    ens, store = load_method(s, "ddpm"), FeatureStore.open(store_path(s, "unlabeled"), read_only=True)
    full = label_images(ens, store, tmp_path / "a", "unlabeled", "t1")

    class Killed(Exception):
        pass

    def kill_at_6(i, _labels):
        if i == 6:
            raise Killed

    with pytest.raises(Killed):
        label_images(ens, store, tmp_path / "b", "unlabeled", "t1", on_image=kill_at_6)
    assert sorted(p.name for p in (tmp_path / "b" / ".parts").glob("part-*")) == ["part-00000.parquet"]
    predicted = []
    real_predict = stage.predict_store
    monkeypatch.setattr(stage, "predict_store", lambda e, src, image_indices: (
        predicted.extend(image_indices) or real_predict(e, src, image_indices=image_indices)))
    again = label_images(ens, store, tmp_path / "b", "unlabeled", "t1")
    assert predicted == list(range(4, 12))  # the finished part is not redone
    pd.testing.assert_frame_equal(again, full)
    for name in (p.name for p in (tmp_path / "a").glob("*.png")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "b" / ".parts").exists()
    # parts of another teacher are not reused
    with pytest.raises(Killed):
        label_images(ens, store, tmp_path / "c", "unlabeled", "t1", on_image=kill_at_6)
    predicted.clear()
    label_images(ens, store, tmp_path / "c", "unlabeled", "t2")
    assert predicted == list(range(12))
