"""Training on images of any size by the rule of prediction (``data.resize``): the teacher's
training store, the rgbxy baseline, the student's and the refiner's data hold the image
resized to S x S (``whole``) or its S x S windows, one entry each (``slide``).

The labelled image here is 96 x 64 (H x W) and S = 32 (``small32-spec``): in slide mode it is
scaled to 48 x 32 and cut at the default stride 22 into the windows at rows 0 and 16. Its
label is ``row // 2``, so the scaled label's row ``i`` (nearest at pixel centres: source row
``2i + 1``) holds ``i``, and window ``(y, 0)``'s row ``r`` holds ``y + r``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.datasets.stage import prepare_dataset
from ddps_core.datasets.training import TrainingView, entries_of_first_images, image_id_of, window_id
from ddps_core.features.stage import store_path
from ddps_core.features.store import FeatureStore
from ddps_core.geometry import tiling

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, S, K = 96, 64, 32, 48


def _image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _label() -> np.ndarray:
    return np.repeat((np.arange(H) // 2)[:, None], W, axis=1).astype(np.uint8)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from ddps_core.diffusion.presets import get_preset
    from ddps_core.diffusion.stage import use_checkpoint
    from ddps_core.diffusion.unet import randomize_zero_init_

    root = tmp_path_factory.mktemp("anysize")
    user = root / "user"
    for split in ("train", "test"):
        (user / "real" / split).mkdir(parents=True)
        Image.fromarray(_image()).save(user / "real" / split / "img.png")
        np.save(user / "real" / split / "img.npy", _label())
    (user / "classes.yaml").write_text(yaml.safe_dump([f"c{i}" for i in range(K)]))
    torch.manual_seed(0)
    model = get_preset("small32-spec").build()
    randomize_zero_init_(model, torch.Generator().manual_seed(1))
    torch.save(model.state_dict(), root / "ckpt.pt")
    raw = {"device": "cpu",
           "data": {"source": "ddpm-seg", "root": str(user), "out": str(root / "dataset")},
           "ddpm": {"preset": "small32-spec", "checkpoint": str(root / "ckpt.pt"), "out": str(root / "ddpm")},
           "features": {"steps": [10], "blocks": [1], "splits": ["train"], "shard_images": 2, "batch_size": 2},
           "teacher": {"baselines": []}}
    s = parse_settings(raw)
    prepare_dataset(s.data)
    use_checkpoint(s.ddpm)
    return root, raw


def _settings(raw, tmp_path, resize, **data):
    return parse_settings({**raw, "data": {**raw["data"], "resize": resize, **data},
                           "features": {**raw["features"], "out": str(tmp_path / "features")}})


def test_slide_the_teachers_training_store_holds_the_windows(project, tmp_path):
    _, raw = project
    s = _settings(raw, tmp_path, "slide")
    stages.get("extract").run(s)
    store = FeatureStore.open(store_path(s, "train"))
    assert store.image_ids == ["img@0_0", "img@16_0"] and store.image_size == S
    # by hand: window (y, 0) row r holds y + r, in every column
    for i, y in enumerate((0, 16)):
        expected = np.repeat(np.arange(y, y + S)[:, None], S, axis=1)
        np.testing.assert_array_equal(store.label(i), expected)
    # and as geometry's tiling cuts the label (prediction's rule)
    t = tiling((H, W), S, "slide")
    assert t.scaled == (48, 32) and t.origins == ((0, 0), (16, 0))
    np.testing.assert_array_equal(np.stack([store.label(i) for i in range(2)]), t.label_crops(_label()))
    # the rgbxy baseline trains on the same entries: its r, g, b are the windows' pixels
    from ddps_core.teacher.stage import feature_source

    rgbxy = feature_source(s, "rgbxy", "train")
    assert rgbxy.image_ids == store.image_ids
    crops = t.crops(_image())
    for i in range(2):
        np.testing.assert_allclose(rgbxy.native(i)[:3], np.moveaxis(crops[i], 2, 0) / 127.5 - 1, atol=1e-6)
        np.testing.assert_array_equal(rgbxy.label(i), store.label(i))


def test_whole_the_store_holds_one_entry_of_the_resized_image(project, tmp_path):
    _, raw = project
    s = _settings(raw, tmp_path, "whole")
    stages.get("extract").run(s)
    store = FeatureStore.open(store_path(s, "train"))
    assert store.image_ids == ["img"] and len(store) == 1
    # rows: 96 -> 32, pixel centres: source row floor((i + 0.5) * 3) = 3i + 1, value (3i + 1) // 2
    expected = np.repeat(((3 * np.arange(S) + 1) // 2)[:, None], S, axis=1)
    np.testing.assert_array_equal(store.label(0), expected)
    np.testing.assert_array_equal(store.label(0), tiling((H, W), S, "whole").label_crops(_label())[0])


def test_a_stride_setting_gives_other_windows(project, tmp_path):
    _, raw = project
    view = TrainingView(DDPMSegFolder(raw["data"]["out"], "train"), S, "slide", stride=8)
    assert view.ids == ["img@0_0", "img@8_0", "img@16_0"]
    assert view[1].image.shape == (S, S, 3) and view[1].label[0, 0] == 8 and view[2].label[-1, 0] == 47
    assert view.num_classes == K and view.content_id() != \
        TrainingView(DDPMSegFolder(raw["data"]["out"], "train"), S, "slide").content_id()


def test_a_stride_beyond_the_window_names_the_key(project):
    from ddps_core.errors import ConfigError

    _, raw = project
    with pytest.raises(ConfigError, match=r"data\.stride: 40 is not between 1 and the window size 32"):
        TrainingView(DDPMSegFolder(raw["data"]["out"], "train"), S, "slide", stride=40)


def test_ids_of_windows_and_the_first_images():
    assert window_id("a@b", 16, 0) == "a@b@16_0" and image_id_of("a@b@16_0") == "a@b"
    assert image_id_of("plain") == "plain" and image_id_of("x@y") == "x@y"
    ids = ["a@0_0", "a@16_0", "b@0_0", "c@0_0", "c@0_22"]
    assert entries_of_first_images(ids, 2) == [0, 1, 2]
    assert entries_of_first_images(ids, None) == [0, 1, 2, 3, 4]
    assert entries_of_first_images(["a", "b", "c"], 2) == [0, 1]


def test_the_student_trains_on_the_same_entries(project, tmp_path):
    """Stage train_student's data (source generated) are the export's images under data.resize;
    its selection images are the real training images taken the same way."""
    from ddps_core.student.stage import training_data

    _, raw = project
    export = tmp_path / "generated"
    (export / "images").mkdir(parents=True)
    (export / "masks").mkdir()
    Image.fromarray(_image()).save(export / "images" / "real_img.png")
    Image.fromarray(_label()).save(export / "masks" / "real_img.png")
    (export / "classes.yaml").write_text(yaml.safe_dump({"classes": [f"c{i}" for i in range(K)]}))
    (export / "manifest.parquet").write_bytes(b"stand-in")
    s = parse_settings({**raw, "data": {**raw["data"], "resize": "slide"},
                        "generate": {"out": str(export)}, "student": {"image_size": S}})
    data = training_data(s)
    assert data["train"].ids == ["real_img@0_0", "real_img@16_0"] and data["val"].ids == ["img@0_0", "img@16_0"]
    image, label = data["train"][1]
    np.testing.assert_array_equal(label, tiling((H, W), S, "slide").label_crops(_label())[1])
    np.testing.assert_array_equal(image, tiling((H, W), S, "slide").crops(_image())[1])
    assert Path(s.student_train_data()) == export
