"""How files are decoded: by their content, not their names. JPEG bytes in a label map are
refused (a lossy codec changes class ids), 16-bit images follow one rule for every file, an
EXIF orientation is applied, and a label that is a dangling link is named as one."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.bad_inputs.conftest import assert_clear_error, image_array, make_user_dataset, snapshot


def _blocky_labels(size: int, k: int, seed: int) -> np.ndarray:
    """Regions of 4x4 pixels of classes away from 0 and k - 1, so that JPEG's ringing changes
    class ids without leaving [0, k): the silent kind of damage."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(k // 4, k - k // 4, (size // 4, size // 4)),
                   np.ones((4, 4), np.int64)).astype(np.uint8)


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder_dataset(root: Path, k: int = 20, size: int = 32) -> Path:
    """A valid ``folder`` dataset: train/ and test/, each with images/ and PNG masks/."""
    for split, n in (("train", 2), ("test", 1)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            seed = i + (100 if split == "test" else 0)
            Image.fromarray(image_array(size, seed)).save(root / split / "images" / f"{split}_{i}.png")
            Image.fromarray(_blocky_labels(size, k, seed)).save(root / split / "masks" / f"{split}_{i}.png")
        (root / split / "classes.yaml").write_text(yaml.safe_dump({"classes": [f"c{i}" for i in range(k)]}))
    return root


@pytest.fixture
def folder_import(tmp_path, cli):
    """A ``folder`` dataset of 20 classes and its earlier import: ``(root, out, params)``."""
    root = make_folder_dataset(tmp_path / "user")
    out = tmp_path / "dataset"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "folder", "root": str(root), "out": str(out)}}))
    assert cli("data", "prepare", "--params", params).code == 0
    return root, out, params


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_jpeg_bytes_in_a_png_mask_are_refused(folder_import, cli, command):
    root, out, params = folder_import
    before = snapshot(out)
    mask = root / "train" / "masks" / "train_1.png"
    labels = np.asarray(Image.open(mask))
    mask.write_bytes(_jpeg_bytes(labels))  # what a careless "save as" gives
    decoded = np.asarray(Image.open(mask))
    assert (decoded != labels).sum() > 0 and decoded.max() < 20  # lossy, yet every value a class id
    if command == "check":
        res = cli("data", "check", root / "train", "--format", "folder", "--split", "all")
    else:
        res = cli("data", "prepare", "--params", params)
    assert_clear_error(res, mask, "JPEG", "lossy")
    assert snapshot(out) == before


def test_jpeg_bytes_in_a_png_prediction_are_refused(tmp_path, cli):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for i in range(2):
        labels = _blocky_labels(32, 20, i)
        np.save(gt / f"im{i}.npy", labels)
        Image.fromarray(labels).save(pred / f"im{i}.png")
    report = tmp_path / "reports" / "report.parquet"
    args = ["score", "--pred", pred, "--gt", gt, "--num-classes", "20", "--out", report]
    assert cli(*args).code == 0
    before = snapshot(report.parent)
    bad = pred / "im1.png"
    bad.write_bytes(_jpeg_bytes(np.load(gt / "im1.npy")))
    res = cli(*args)
    assert_clear_error(res, bad, "JPEG", "lossy")
    assert snapshot(report.parent) == before


def _png16(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array.astype(np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # really stored as 16-bit grey


def test_16_bit_images_follow_one_rule_for_every_file(tmp_path, cli):
    """Value v of any 16-bit image becomes v >> 8, whatever else the file holds: 260 -> 1 in
    one file, 200 -> 0 in a file whose values all stay below 256 (no per-file stretching)."""
    root = make_user_dataset(tmp_path / "user", n_train=2, n_test=1, size=4)
    wide = np.array([[0, 260, 65535, 386], [257 * 7, 255, 256, 511], [100, 200, 30000, 65280],
                     [1, 2, 3, 4]], np.uint16)
    narrow = np.array([[0, 200, 255, 100]] * 4, np.uint16)
    _png16(wide, root / "real" / "train" / "train_0.png")
    _png16(narrow, root / "real" / "train" / "train_1.png")
    out = tmp_path / "dataset"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "ddpm-seg", "root": str(root), "out": str(out)}}))
    assert cli("data", "prepare", "--params", params).code == 0
    for name, raw in (("train_0", wide), ("train_1", narrow)):
        got = np.asarray(Image.open(out / "real" / "train" / f"{name}.png"))
        want = np.floor(raw.astype(np.float64) / 256).astype(np.uint8)  # the high byte
        np.testing.assert_array_equal(got, np.repeat(want[:, :, None], 3, axis=2))
    assert int(np.asarray(Image.open(out / "real" / "train" / "train_0.png"))[0, 1, 0]) == 1


def test_exif_orientation_is_applied_to_an_image(tmp_path, cli):
    """A phone JPEG stored 8 wide x 6 high with orientation 6 (shown turned 90 degrees clockwise,
    6 wide x 8 high); its label was drawn on the picture as shown."""
    root = make_user_dataset(tmp_path / "user", n_train=2, n_test=1)
    stored = np.kron(image_array(4, 3)[:3], np.ones((2, 2, 1), np.uint8))  # 6 x 8 (H x W)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpg = root / "real" / "train" / "train_1.jpg"
    (root / "real" / "train" / "train_1.png").unlink()
    Image.fromarray(stored).save(jpg, quality=95, exif=exif)
    np.save(root / "real" / "train" / "train_1.npy", np.zeros((8, 6), np.uint8))  # H x W as shown
    out = tmp_path / "dataset"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "ddpm-seg", "root": str(root), "out": str(out)}}))
    res = cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    decoded = np.asarray(Image.open(jpg).convert("RGB"))  # the stored pixels, orientation not applied
    shown = np.rot90(decoded, k=-1)  # orientation 6: turn 90 degrees clockwise
    np.testing.assert_array_equal(np.asarray(Image.open(out / "real" / "train" / "train_1.png")), shown)


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_a_label_that_is_a_dangling_link_is_named_as_one(imported, cli, command):
    root, out, params = imported
    before = snapshot(out)
    label = root / "real" / "train" / "train_1.npy"
    label.unlink()
    os.symlink(root / "moved" / "train_1.npy", label)
    res = cli("data", "check", root) if command == "check" else cli("data", "prepare", "--params", params)
    assert_clear_error(res, label, "dangling symbolic link", root / "moved" / "train_1.npy")
    assert snapshot(out) == before
