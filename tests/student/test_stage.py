"""Stage train_student on a tiny project: trained on the generated set, its test-split
predictions written, and scored by stage evaluate next to the teacher exactly as an
independent scoring of its PNGs."""

import json

import pytest

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.metrics import ConfusionAccumulator
from ddps_core.metrics.files import load_label_map
from tests.generate.test_stage import labelled_project

pytestmark = pytest.mark.usefixtures("one_thread")


def test_student_is_trained_predicts_and_is_scored_next_to_the_teacher(tmp_path):
    raw = labelled_project(tmp_path)
    s = parse_settings(raw)
    stages.get("generate").run(s)
    info = stages.get("train_student").run(s)
    assert info["n_train"] == 13 and info["best_epoch"] == 1
    pred = tmp_path / "student" / "test"
    assert len(list(pred.glob("*.png"))) == 3
    summary = stages.get("evaluate").run(s)
    assert list(summary) == ["teacher", "student"]
    truth = DDPMSegFolder(s.data.out, "test")  # the dataset's own labels
    acc = ConfusionAccumulator(7)
    for sample in truth:
        acc.update(load_label_map(pred / f"{sample.id}.png"), sample.label, sample.id)
    assert summary["student"]["miou"] == pytest.approx(100 * acc.result().miou, abs=1e-4, nan_ok=True)
    assert summary["student"]["miou"] == pytest.approx(100 * info["test_miou"], abs=1e-4, nan_ok=True)
    metrics = json.loads((tmp_path / "reports" / "metrics" / "evaluate.json").read_text())
    assert metrics["student"]["miou"] == pytest.approx(summary["student"]["miou"], nan_ok=True)
    stages.get("report").run(s)
    assert (tmp_path / "reports" / "figures" / "overlays" / f"student_{truth.ids[0]}.png").is_file()
    import pandas as pd

    per_class = pd.read_csv(tmp_path / "reports" / "plots" / "per_class_iou.csv")
    assert per_class["student"].notna().all() and per_class["random_unet"].isna().all()


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_split_labels_each_image_at_its_size_and_scores_its_own_labels(tmp_path, mode):
    """Test images of 96 x 64, 64 x 160 and 32 x 32 px (the refiner's tiny project): the PNGs
    are at the images' sizes, equal the student predictor's labels, and every labelled pixel
    of the labels at their own size is scored."""
    import numpy as np

    from ddps_core.datasets import DDPMSegFolder
    from ddps_core.inference.student import load_student_predictor
    from ddps_core.student.stage import predict_split
    from tests.refiner.test_stage import TEST_SHAPES, _project, _settings

    _project(tmp_path)
    s = _settings(tmp_path)
    s = s.model_copy(update={"data": s.data.model_copy(update={"resize": mode})})
    result = predict_split(s, "test", tmp_path / "pred")
    reader = DDPMSegFolder(s.data.out, "test")
    samples = [reader[k] for k in range(len(reader))]
    assert {x.image.shape[:2] for x in samples} == set(TEST_SHAPES)
    predictor = load_student_predictor(s, "cpu")
    assert (predictor.model, predictor.size, predictor.num_classes) == ("student", 32, 4)
    acc = ConfusionAccumulator(4)
    for x, p in zip(samples, predictor([x.image for x in samples]), strict=True):
        saved = load_label_map(tmp_path / "pred" / f"{x.id}.png")
        assert saved.shape == x.label.shape and np.array_equal(saved, p.labels)
        acc.update(saved, x.label, x.id)
    assert int(result.area_label.sum()) == sum(int((x.label != 255).sum()) for x in samples)
    assert result.miou == pytest.approx(acc.result().miou, nan_ok=True)


def test_predict_split_uses_the_test_time_augmentation_of_evaluate(tmp_path):
    import numpy as np

    from ddps_core.datasets import DDPMSegFolder
    from ddps_core.inference.student import load_student_predictor
    from ddps_core.student.stage import predict_split
    from tests.refiner.test_stage import _project, _settings

    _project(tmp_path)
    s = _settings(tmp_path)
    s = s.model_copy(update={"evaluate": s.evaluate.model_copy(update={"flip": True})})
    predict_split(s, "test", tmp_path / "pred")
    reader = DDPMSegFolder(s.data.out, "test")
    images = [reader[k].image for k in range(len(reader))]
    flipped = load_student_predictor(s, "cpu", flip=True)(images)
    for sid, p in zip(reader.ids, flipped, strict=True):
        assert np.array_equal(load_label_map(tmp_path / "pred" / f"{sid}.png"), p.labels)
