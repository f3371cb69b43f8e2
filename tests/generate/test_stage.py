"""Stage generate on a tiny project: both sources, per-source filtering with the expected
counts, a rerun that reuses the samples, and a pool labelled by another teacher refused."""

import shutil

import numpy as np
import pandas as pd
import pytest

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.datasets import GenericFolder
from ddps_core.errors import DataError
from ddps_core.metrics.files import load_label_map
from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


def labelled_project(root, **sections):
    """A tiny project whose teacher is trained and has labelled the test split and the pool;
    ``sections`` are merged over its settings. Returns the raw settings."""
    raw = tiny_project(
        root, {"n_unlabeled": 12, "n_labeled": 4, "n_test": 3},
        features={"steps": [10], "blocks": [1, 2], "shard_images": 4, "batch_size": 4, "out": str(root / "features")},
        teacher={"baselines": [], "members": 2, "max_epochs": 1, "out": str(root / "teacher"),
                 "labels_out": str(root / "labels"), "min_class_pixels": 1},
        generate={"source": "both", "n_samples": 5, "sample_steps": 2, "batch_size": 2, "filter": "drop_both",
                  "drop_certain": 2, "drop_uncertain": 0.2, "out": str(root / "generated"),
                  "work": str(root / "work"), "contact_sheet": 2},
        student={"epochs": 1, "batch_size": 4, "warmup_steps": 0, "out": str(root / "student")},
        evaluate={"reports": str(root / "reports")}, report={"overlays": 1}, **sections)
    s = parse_settings(raw)
    for name in ("extract", "train_teacher", "label"):
        stages.get(name).run(s)
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return root, labelled_project(root)


def test_generate_both_sources_filters_each_and_reruns_cheaply(project):
    root, raw = project
    s = parse_settings(raw)
    stats = stages.get("generate").run(s)
    # drop_both: pool 12 - 2 most certain - ceil(0.2 * 12) = 3 most uncertain; generated 5 - 2 - 1
    assert stats["pool"]["kept"] == 7 and stats["pool"]["dropped"] == {"most_certain": 2, "most_uncertain": 3}
    assert stats["generated"]["kept"] == 2 and stats["generated"]["dropped"] == {"most_certain": 2, "most_uncertain": 1}
    assert stats["real"]["kept"] == 4 and stats["total_kept"] == 13
    manifest = pd.read_parquet(root / "generated" / "manifest.parquet")
    reader = GenericFolder(root / "generated")
    assert sorted(reader.ids) == sorted(manifest.loc[manifest["kept"], "image_id"])
    gen = manifest[manifest["source"] == "generated"]
    assert list(gen["sampler_steps"].unique()) == [2] and gen["teacher"].nunique() == 1
    # the pool's scores are the label stage's
    pool_scores = pd.read_parquet(root / "labels" / "teacher" / "unlabeled" / "scores.parquet")
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
    stats2 = stages.get("generate").run(parse_settings(raw2))
    assert stats2["total_kept"] == 12 + 5 + 4
    assert {p.name: p.stat().st_mtime_ns for p in (root / "work" / "samples" / "images").iterdir()} == stamps
    stages.get("generate").run(s)  # back to the first settings for the next tests


def test_generate_refuses_a_pool_labelled_by_another_teacher(project, tmp_path):
    root, raw = project
    labels = tmp_path / "labels"
    shutil.copytree(root / "labels", labels)
    (labels / "teacher" / "unlabeled" / "teacher.txt").write_text("0123456789abcdef")
    raw2 = {**raw, "teacher": {**raw["teacher"], "labels_out": str(labels)},
            "generate": {**raw["generate"], "source": "pool", "out": str(tmp_path / "g")}}
    with pytest.raises(DataError, match="another teacher"):
        stages.get("generate").run(parse_settings(raw2))
    assert not (tmp_path / "g").exists()


def test_a_source_the_reference_filter_empties_is_warned_about(project, tmp_path):
    """12 pool images and 5 samples: fewer than the (2 + 1) / 0.2 = 15 candidates the
    reference rule needs to keep any, so it keeps none of either source, and says so."""
    from ddps_core.progress import CallbackReporter

    root, raw = project
    raw2 = {**raw, "generate": {**raw["generate"], "filter": "reference", "out": str(tmp_path / "g")}}
    logs = []
    stats = stages.get("generate").run(parse_settings(raw2), CallbackReporter(log=logs.append))
    assert stats["pool"]["kept"] == 0 and stats["real"]["kept"] == 4
    warned = [m for m in logs if m.startswith("warning:")]
    assert len(warned) == 2 and "fewer than 15 candidates" in warned[0] and "drop_both" in warned[0]


def test_soft_labels_are_kept_exported_and_distilled(tmp_path):
    """teacher.soft_labels: the pool is labelled again (its labels lack them), each pool and
    sampled image keeps the members' mean softmax (a distribution per pixel whose argmax is
    mostly the vote), the export carries them for kept teacher-labelled images only, and a
    student distils from them; a student asking for them without an export that has them is
    refused with the manifest named."""
    raw = labelled_project(tmp_path)
    hard = parse_settings({**raw, "student": {**raw["student"], "out": str(tmp_path / "hard")}})
    stages.get("generate").run(hard)
    with pytest.raises(DataError, match="manifest.parquet: the export has no soft labels"):
        stages.get("train_student").run(parse_settings(
            {**raw, "teacher": {**raw["teacher"], "soft_labels": True}, "student": {**raw["student"], "distill": "soft"}}))
    pool = tmp_path / "labels" / "teacher" / "unlabeled"
    stamp = (pool / "scores.parquet").stat().st_mtime_ns
    raw = {**raw, "teacher": {**raw["teacher"], "soft_labels": True},
           "student": {**raw["student"], "distill": "soft", "temperature": 2.0}}
    s = parse_settings(raw)
    stages.get("label").run(s)
    assert (pool / "scores.parquet").stat().st_mtime_ns != stamp  # relabelled, now with soft labels
    probs = np.load(pool / f"{pd.read_parquet(pool / 'scores.parquet')['image_id'][0]}_probs.npy")
    assert probs.dtype == np.float16 and probs.shape == (7, 32, 32)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert not list((tmp_path / "labels" / "teacher" / "test").glob("*_probs.npy"))  # the pool's only
    stages.get("generate").run(s)
    manifest = pd.read_parquet(tmp_path / "generated" / "manifest.parquet")
    kept = manifest[manifest["kept"]]
    assert kept.loc[kept["source"] != "real", "soft"].notna().all() and kept.loc[kept["source"] == "real", "soft"].isna().all()
    assert manifest.loc[~manifest["kept"], "soft"].isna().all()
    row = kept[kept["source"] == "pool"].iloc[0]
    exported = np.load(tmp_path / "generated" / row["soft"])
    assert np.array_equal(exported, np.load(pool / f"{row['source_id']}_probs.npy"))
    assert (tmp_path / "generated" / row["soft"].replace(".npy", "_uncertainty.png")).is_file()
    info = stages.get("train_student").run(s)
    assert info["epochs"] == 1 and (tmp_path / "student" / "student.safetensors").is_file()
