"""Stage evaluate scores at the labels' own size: a 12 x 20 test label (not S x S, S = 32)
and a prediction PNG of that size; the report's areas equal counts made by hand, the report
records the protocol, and a prediction of another size is one clear error."""

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.errors import DataError

IGNORE = 255


def workspace(tmp_path, pred_shape=(12, 20)):
    root = tmp_path / "dataset"
    for split in ("train", "test"):
        (root / "real" / split).mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c"], "ignore_index": IGNORE}))
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (12, 20)).astype(np.uint8)
    label[0, :5] = IGNORE
    for split in ("train", "test"):
        Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "real" / split / "x.png")
        np.save(root / "real" / split / "x.npy", label)
    pred = rng.integers(0, 3, pred_shape).astype(np.uint8)
    folder = tmp_path / "labels" / "teacher" / "test"
    folder.mkdir(parents=True)
    Image.fromarray(pred).save(folder / "x.png")
    settings = parse_settings({
        "data": {"out": str(root), "ignore_index": IGNORE},
        "ddpm": {"preset": "small32-spec"},
        "teacher": {"baselines": [], "labels_out": str(tmp_path / "labels")},
        "evaluate": {"student": False, "reports": str(tmp_path / "reports"), "flip": True}})
    return settings, label, pred


def test_the_confusion_counts_at_the_labels_size_equal_a_hand_count(tmp_path):
    settings, label, pred = workspace(tmp_path)
    summary = stages.get("evaluate").run(settings)
    df = pd.read_parquet(tmp_path / "reports" / "evaluate.parquet")
    assert set(df["resize"]) == {"whole"} and set(df["model_size"]) == {32} and set(df["tta"]) == {"flip"}
    scored = label != IGNORE
    ious = []
    for c in range(3):
        row = df.query("scope == 'class' and class_id == @c").iloc[0]
        inter = int(((pred == c) & (label == c) & scored).sum())
        union = int((((pred == c) | (label == c)) & scored).sum())
        assert (row["area_intersect"], row["area_union"]) == (inter, union)
        assert row["area_label"] == int(((label == c) & scored).sum())
        ious.append(inter / union)
    assert int(df.query("scope == 'class'")["area_label"].sum()) == 12 * 20 - 5  # every pixel but the ignored
    assert summary["teacher"]["miou"] == pytest.approx(100 * np.mean(ious), abs=1e-4)


def test_a_prediction_of_another_size_is_one_error_naming_its_file(tmp_path):
    settings, _, _ = workspace(tmp_path, pred_shape=(32, 32))
    with pytest.raises(DataError, match=r"x\.png: prediction is 32x32, the label 20x12; rerun the label stage"):
        stages.get("evaluate").run(settings)
