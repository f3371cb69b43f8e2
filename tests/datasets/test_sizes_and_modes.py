"""Inputs that are used after one documented repair: every image mode becomes 8-bit RGB by the
rule of ``load_image`` (docs/datasets.md, "Image modes"), and a label map of another size than
its image is resized to it, nearest neighbour as the DDPM-Seg reference's OpenCV call samples,
with a warning naming the file. Expected values are written out by hand."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ddps_core.datasets import DDPMSegFolder, load_image
from ddps_core.errors import DataWarning


def _write(path: Path, im: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


# ------------------------------------------------------------------------------------ modes
def test_grey_is_copied_to_all_three_channels(tmp_path):
    p = _write(tmp_path / "g.png", Image.fromarray(np.array([[0, 7, 128, 255]], np.uint8), "L"))
    assert load_image(p).tolist() == [[[0, 0, 0], [7, 7, 7], [128, 128, 128], [255, 255, 255]]]


def test_bilevel_is_black_and_white(tmp_path):
    im = Image.new("1", (3, 1))
    im.putpixel((1, 0), 1)
    p = _write(tmp_path / "b.png", im)
    assert load_image(p).tolist() == [[[0, 0, 0], [255, 255, 255], [0, 0, 0]]]


def test_sixteen_bit_grey_keeps_its_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 1000, 40000, 65535]], np.uint16)
    p = _write(tmp_path / "w.png", Image.fromarray(values))
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # read back as 16-bit grey, not clipped to 8 bits by PIL
    # v // 256: 0, 0, 1, 3, 156, 255 (PIL's convert would clip to 0, 255, 255, 255, 255, 255)
    assert load_image(p)[0, :, 0].tolist() == [0, 0, 1, 3, 156, 255]
    assert (load_image(p) == load_image(p)[..., :1]).all()


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], np.uint8)
    p = _write(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))
    assert load_image(p).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    la = np.array([[[90, 0], [30, 255]]], np.uint8)
    q = _write(tmp_path / "la.png", Image.fromarray(la, "LA"))
    assert load_image(q).tolist() == [[[90, 90, 90], [30, 30, 30]]]


def test_palette_index_becomes_its_colour_and_transparency_is_dropped(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    im.putpalette([0, 0, 0, 200, 100, 50, 1, 2, 3] + [0] * (256 * 3 - 9))
    p = _write(tmp_path / "p.png", im)
    assert load_image(p).tolist() == [[[0, 0, 0], [200, 100, 50], [1, 2, 3]]]
    im.info["transparency"] = 1
    q = tmp_path / "pt.png"
    im.save(q, transparency=1)
    with Image.open(q) as back:
        assert "transparency" in back.info
    assert load_image(q).tolist() == [[[0, 0, 0], [200, 100, 50], [1, 2, 3]]]


# ------------------------------------------------------------------------- label size fixes
def _dataset(root: Path, image_hw: tuple[int, int], label: np.ndarray) -> Path:
    (root / "real" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((*image_hw, 3), np.uint8)).save(root / "real" / "train" / "a.png")
    np.save(root / "real" / "train" / "a.npy", label)
    return root


def test_a_label_of_another_size_is_resized_nearest_with_a_warning_naming_the_file(tmp_path):
    # label 2 x 3 for an image 4 x 6: OpenCV's INTER_NEAREST takes source floor(x * in / out)
    label = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    root = _dataset(tmp_path / "ds", (4, 6), label)
    reader = DDPMSegFolder(root, "train", num_classes=7)
    with pytest.warns(DataWarning) as caught:
        sample = reader[0]
    (w,) = caught
    assert str(root / "real" / "train" / "a.npy") in str(w.message)
    assert "2x3 (HxW) differs from image" in str(w.message) and "4x6" in str(w.message)
    assert sample.label.tolist() == [[1, 1, 2, 2, 3, 3],
                                     [1, 1, 2, 2, 3, 3],
                                     [4, 4, 5, 5, 6, 6],
                                     [4, 4, 5, 5, 6, 6]]


def test_a_larger_label_is_sampled_at_floor_not_at_pixel_centres(tmp_path):
    # label 4 x 4 for an image 2 x 2: rows and columns 0 and 2 (floor(x * 2)), not 1 and 3
    label = np.arange(16, dtype=np.uint8).reshape(4, 4)
    root = _dataset(tmp_path / "ds", (2, 2), label)
    with pytest.warns(DataWarning):
        sample = DDPMSegFolder(root, "train", num_classes=16)[0]
    assert sample.label.tolist() == [[0, 2], [8, 10]]


def test_labels_of_the_right_size_give_no_warning(tmp_path):
    root = _dataset(tmp_path / "ds", (2, 3), np.zeros((2, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DDPMSegFolder(root, "train", num_classes=2)[0].label.shape == (2, 3)


def test_the_import_reports_the_resize_and_writes_the_label_at_the_image_size(tmp_path):
    from ddps_core.config import DataSettings
    from ddps_core.datasets.stage import prepare_dataset

    label = np.array([[0, 1], [1, 0]], np.uint8)
    root = _dataset(tmp_path / "ds", (4, 4), label)
    (root / "classes.yaml").write_text(yaml.safe_dump(["a", "b"]))
    said: list[str] = []
    prepare_dataset(DataSettings(source="ddpm-seg", root=str(root), out=str(tmp_path / "out")), warn=said.append)
    assert any(str(root / "real" / "train" / "a.npy") in line and "resized" in line for line in said), said
    written = np.load(tmp_path / "out" / "real" / "train" / "a.npy")
    assert written.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
