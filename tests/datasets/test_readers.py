"""Tests of ddps_core.datasets: readers, validation errors, to_square and the synthetic domain."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ddps_core.datasets import (
    ADE20K,
    CITYSCAPES_CLASSES,
    DATASET_KINDS,
    SYNTHETIC_CLASSES,
    Cityscapes,
    DDPMSegFolder,
    GenericFolder,
    Sample,
    make_synthetic,
    open_dataset,
    synthetic_sample,
    to_square,
)
from ddps_core.errors import DataError

# --------------------------------------------------------------------------------------------
# Fixture helpers
# --------------------------------------------------------------------------------------------


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_img(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    im.save(path)
    return path


def _save_npy(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return path


def _ddpm_fixture(root: Path, n_train: int = 3, n_test: int = 2, n_unl: int = 2, h: int = 8, w: int = 6):
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            _save_img(root / "real" / split / f"s{i}.png", _rgb(h, w, i))
            _save_npy(root / "real" / split / f"s{i}.npy", (np.arange(h * w).reshape(h, w) % 3).astype(np.uint8))
    for i in range(n_unl):
        _save_img(root / "unlabeled" / f"u{i}.jpg", _rgb(h, w, 10 + i))
    return root


def _raises_naming(match_path: Path, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        r = fn(*args, **kwargs)
        # construction may succeed; reading then must fail
        for _ in r:
            pass
    msg = str(info.value)
    assert str(match_path) in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# DDPMSegFolder
# --------------------------------------------------------------------------------------------


def test_ddpmseg_reads_all_splits(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    (root / "classes.yaml").write_text(yaml.safe_dump(["a", "b", "c"]))
    tr = DDPMSegFolder(root, "train")
    assert tr.num_classes == 3 and tr.ignore_index == 255 and tr.class_names == ["a", "b", "c"]
    assert len(tr) == 3 and tr.ids == ["s0", "s1", "s2"]
    samples = list(tr)
    assert all(isinstance(s, Sample) for s in samples)
    s = tr[1]
    assert s.id == "s1" and s.image.dtype == np.uint8 and s.image.shape == (8, 6, 3)
    assert s.label.dtype == np.uint8 and s.label.shape == (8, 6)
    assert np.array_equal(s.image, _rgb(8, 6, 1))
    assert tr[-1].id == "s2"
    with pytest.raises(IndexError):
        tr[3]
    assert len(DDPMSegFolder(root, "test")) == 2
    unl = DDPMSegFolder(root, "unlabeled")
    assert unl.ids == ["u0", "u1"] and all(s.label is None for s in unl)
    assert unl[0].image.shape == (8, 6, 3)


def test_ddpmseg_classes_yaml_mapping_and_explicit_num_classes(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["x", "y", "z", "w"]}))
    assert DDPMSegFolder(root, "train").num_classes == 4
    with pytest.raises(DataError, match="classes.yaml"):
        DDPMSegFolder(root, "train", num_classes=5)
    (root / "classes.yaml").unlink()
    r = DDPMSegFolder(root, "train", num_classes=3)
    assert r.class_names is None and r.num_classes == 3
    with pytest.raises(DataError, match="num_classes"):
        DDPMSegFolder(root, "train")


def test_ddpmseg_unknown_split(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    with pytest.raises(DataError, match="split"):
        DDPMSegFolder(root, "val", num_classes=3)


def test_image_modes_converted_to_rgb(tmp_path):
    root = tmp_path / "ds"
    base = _rgb(5, 7, 3)
    _save_img(root / "unlabeled" / "grey.png", base, "L")
    _save_img(root / "unlabeled" / "rgba.png", base, "RGBA")
    _save_img(root / "unlabeled" / "pal.png", base, "P")
    r = DDPMSegFolder(root, "unlabeled", num_classes=2)
    for s in r:
        assert s.image.shape == (5, 7, 3) and s.image.dtype == np.uint8, s.id
    grey = r[r.ids.index("grey")].image
    assert np.array_equal(grey[..., 0], grey[..., 2])
    assert np.array_equal(r[r.ids.index("rgba")].image, base)


def test_require_labels_false_yields_none(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    (root / "real" / "train" / "s1.npy").unlink()
    r = DDPMSegFolder(root, "train", num_classes=3, require_labels=False)
    labels = [s.label for s in r]
    assert labels[0] is not None and labels[1] is None and labels[2] is not None


def test_reading_is_lazy(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    bad = root / "real" / "train" / "s2.png"
    bad.write_bytes(b"not a png at all")
    r = DDPMSegFolder(root, "train", num_classes=3)  # construction does not decode files
    assert r[0].id == "s0"
    it = iter(r)
    assert next(it).id == "s0" and next(it).id == "s1"
    with pytest.raises(DataError):
        next(it)


def test_uint16_and_int64_npy_labels(tmp_path):
    root = tmp_path / "ds"
    _save_img(root / "real" / "train" / "a.png", _rgb(4, 4))
    _save_npy(root / "real" / "train" / "a.npy", np.full((4, 4), 300, np.int64))
    _save_img(root / "real" / "train" / "b.png", _rgb(4, 4))
    _save_npy(root / "real" / "train" / "b.npy", np.full((4, 4), 2, np.int64))
    r = DDPMSegFolder(root, "train", num_classes=400, ignore_index=1000)
    assert r[0].label.dtype == np.uint16 and int(r[0].label[0, 0]) == 300
    assert r[1].label.dtype == np.uint8


# --------------------------------------------------------------------------------------------
# Validation errors (one per kind), each naming the file
# --------------------------------------------------------------------------------------------


def test_error_corrupt_image(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    bad = root / "real" / "train" / "s1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _raises_naming(bad, DDPMSegFolder, root, "train", num_classes=3)


def test_error_truncated_png_image(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds", h=32, w=32)
    bad = root / "real" / "train" / "s0.png"
    bad.write_bytes(bad.read_bytes()[:-40])
    _raises_naming(bad, DDPMSegFolder, root, "train", num_classes=3)


def test_error_truncated_npy_label(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    bad = root / "real" / "train" / "s0.npy"
    bad.write_bytes(bad.read_bytes()[:-10])
    msg = _raises_naming(bad, DDPMSegFolder, root, "train", num_classes=3)
    assert "npy" in msg


def test_error_corrupt_png_mask(tmp_path):
    root = tmp_path / "gf"
    _save_img(root / "images" / "a.png", _rgb(4, 4))
    bad = root / "masks" / "a.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    _raises_naming(bad, GenericFolder, root, num_classes=2)


def test_error_missing_label(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    (root / "real" / "test" / "s1.npy").unlink()
    msg = _raises_naming(root / "real" / "test" / "s1.png", DDPMSegFolder, root, "test", num_classes=3)
    assert "no label" in msg


def test_error_label_without_image(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    orphan = _save_npy(root / "real" / "train" / "zz.npy", np.zeros((8, 6), np.uint8))
    _raises_naming(orphan, DDPMSegFolder, root, "train", num_classes=3)


def test_error_label_value_out_of_range(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    arr = np.zeros((8, 6), np.uint8)
    arr[0, 0], arr[1, 1], arr[2, 2] = 7, 255, 2  # 255 is the ignore index: fine
    lab = _save_npy(root / "real" / "train" / "s2.npy", arr)
    msg = _raises_naming(lab, DDPMSegFolder, root, "train", num_classes=3)
    assert "value(s) 7 >= num_classes=3" in msg


def test_error_empty_split(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds", n_test=0)
    (root / "real" / "test").mkdir(parents=True, exist_ok=True)
    msg = _raises_naming(root / "real" / "test", DDPMSegFolder, root, "test", num_classes=3)
    assert "empty" in msg


def test_error_missing_split_folder(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds", n_unl=0)
    _raises_naming(root / "unlabeled", DDPMSegFolder, root, "unlabeled", num_classes=3)


def test_error_duplicate_stems(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    dup = _save_img(root / "real" / "train" / "s0.jpg", _rgb(8, 6))
    msg = _raises_naming(dup, DDPMSegFolder, root, "train", num_classes=3)
    assert str(root / "real" / "train" / "s0.png") in msg


def test_error_npy_not_2d(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    lab = _save_npy(root / "real" / "train" / "s0.npy", np.zeros((8, 6, 1), np.uint8))
    msg = _raises_naming(lab, DDPMSegFolder, root, "train", num_classes=3)
    assert "2-D" in msg


def test_error_npy_float_dtype(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    lab = _save_npy(root / "real" / "train" / "s0.npy", np.zeros((8, 6), np.float32))
    msg = _raises_naming(lab, DDPMSegFolder, root, "train", num_classes=3)
    assert "integer" in msg


def test_error_bad_classes_yaml(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    (root / "classes.yaml").write_text("classes: [a, b\n")
    _raises_naming(root / "classes.yaml", DDPMSegFolder, root, "train")


# --------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------


def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    ann = np.array([[0, 1, 2], [150, 5, 0]], np.uint8)
    for sid in ("ADE_train_00000002", "ADE_train_00000001"):
        _save_img(root / "images" / "training" / f"{sid}.jpg", _rgb(2, 3))
        _save_img(root / "annotations" / "training" / f"{sid}.png", ann)
    r = ADE20K(root, "training")
    assert r.num_classes == 150 and len(r.class_names) == 150 and r.ignore_index == 255
    assert r.ids == ["ADE_train_00000001", "ADE_train_00000002"]
    s = r[0]
    assert s.image.shape == (2, 3, 3) and s.label.dtype == np.uint8
    assert s.label.tolist() == [[255, 0, 1], [149, 4, 255]]
    assert len(open_dataset("ade20k", root, "train")) == 2


def test_ade20k_errors(tmp_path):
    root = tmp_path / "ade"
    _save_img(root / "images" / "validation" / "a.jpg", _rgb(2, 2))
    bad = _save_img(root / "annotations" / "validation" / "a.png", np.full((2, 2), 151, np.uint8))
    msg = _raises_naming(bad, ADE20K, root, "validation")
    assert "150" in msg
    _save_img(root / "images" / "validation" / "b.jpg", _rgb(2, 2))
    _raises_naming(root / "images" / "validation" / "b.jpg", ADE20K, root, "validation")
    with pytest.raises(DataError, match="split"):
        ADE20K(root, "test")


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------


def _city_img(root: Path, split: str, city: str, name: str, h: int = 2, w: int = 4) -> Path:
    return _save_img(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", _rgb(h, w))


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = tmp_path / "cs"
    ids = np.array([[0, 7, 8, 11, 12, 13, 17, 19], [20, 21, 22, 23, 24, 25, 26, 27],
                    [28, 31, 32, 33, 1, 6, 9, 10], [14, 15, 16, 18, 29, 30, 34, 255]], np.uint8)
    _city_img(root, "val", "bonn", "bonn_000000_000019", 4, 8)
    _save_img(root / "gtFine" / "val" / "bonn" / "bonn_000000_000019_gtFine_labelIds.png", ids)
    r = Cityscapes(root, "val")
    assert r.num_classes == 19 and r.class_names == CITYSCAPES_CLASSES and r.ids == ["bonn_000000_000019"]
    lab = r[0].label
    expected = np.full_like(ids, 255)
    expected[0, 1:] = range(0, 7)
    expected[1, :] = range(7, 15)
    expected[2, :4] = range(15, 19)
    assert lab.tolist() == expected.tolist()


def test_cityscapes_prefers_label_train_ids(tmp_path):
    root = tmp_path / "cs"
    for city, name in (("zurich", "zurich_000001_000019"), ("aachen", "aachen_000000_000019")):
        _city_img(root, "train", city, name)
        gt = root / "gtFine" / "train" / city
        _save_img(gt / f"{name}_gtFine_labelIds.png", np.full((2, 4), 26, np.uint8))  # car -> 13
    _save_img(root / "gtFine" / "train" / "zurich" / "zurich_000001_000019_gtFine_labelTrainIds.png",
              np.array([[0, 1, 18, 255]] * 2, np.uint8))
    r = open_dataset("cityscapes", root, "train")
    assert r.ids == ["aachen_000000_000019", "zurich_000001_000019"]
    assert np.all(r[0].label == 13)
    assert r[1].label.tolist() == [[0, 1, 18, 255]] * 2


def test_cityscapes_missing_label(tmp_path):
    root = tmp_path / "cs"
    img = _city_img(root, "train", "ulm", "ulm_000000_000019")
    (root / "gtFine" / "train" / "ulm").mkdir(parents=True)
    _raises_naming(img, Cityscapes, root, "train")
    # the test split's labels are optional
    _city_img(root, "test", "berlin", "berlin_000000_000019")
    assert Cityscapes(root, "test")[0].label is None


# --------------------------------------------------------------------------------------------
# GenericFolder
# --------------------------------------------------------------------------------------------


def test_generic_folder_png_and_npy_masks(tmp_path):
    root = tmp_path / "gf"
    _save_img(root / "images" / "b.jpg", _rgb(3, 5))
    _save_img(root / "images" / "a.png", _rgb(3, 5))
    _save_img(root / "masks" / "a.png", np.full((3, 5), 1, np.uint8))
    _save_npy(root / "masks" / "b.npy", np.full((3, 5), 2, np.int32))
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["bg", "cat", "dog"]}))
    r = GenericFolder(root)
    assert r.ids == ["a", "b"] and r.num_classes == 3 and r.class_names == ["bg", "cat", "dog"]
    assert np.all(r[0].label == 1) and np.all(r[1].label == 2) and r[1].label.dtype == np.uint8
    # palette-mode mask: the palette index is the class id
    pal = Image.fromarray(np.full((3, 5), 2, np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    pal.save(root / "masks" / "a.png")
    assert np.all(GenericFolder(root)[0].label == 2)
    # open_dataset: split=None -> the root itself, else <root>/<split>
    assert len(open_dataset("folder", root, None)) == 2
    with pytest.raises(DataError, match="train"):
        open_dataset("folder", root, "train", num_classes=3)


def test_generic_folder_errors(tmp_path):
    root = tmp_path / "gf"
    _save_img(root / "images" / "a.png", _rgb(3, 5))
    _save_img(root / "masks" / "a.png", np.zeros((3, 5), np.uint8))
    orphan = _save_img(root / "masks" / "c.png", np.zeros((3, 5), np.uint8))
    _raises_naming(orphan, GenericFolder, root, num_classes=2)
    orphan.unlink()
    _save_img(root / "images" / "d.png", _rgb(3, 5))
    jpg_mask = _save_img(root / "masks" / "d.jpg", np.zeros((3, 5), np.uint8))
    msg = _raises_naming(root / "images" / "d.png", GenericFolder, root, num_classes=2)
    assert str(jpg_mask) in msg
    assert [s.label is None for s in GenericFolder(root, num_classes=2, require_labels=False)] == [False, True]
    rgb_mask = _save_img(root / "masks" / "a.png", _rgb(3, 5))
    _raises_naming(rgb_mask, GenericFolder, root, num_classes=2, require_labels=False)


def test_open_dataset_kinds(tmp_path):
    root = _ddpm_fixture(tmp_path / "ds")
    assert len(open_dataset("ddpm-seg", root, "train", num_classes=3)) == 3
    with pytest.raises(DataError) as info:
        open_dataset("coco", root, "train")
    for kind in DATASET_KINDS:
        assert kind in str(info.value)
    with pytest.raises(DataError, match="150"):
        open_dataset("ade20k", root, "training", num_classes=10)


# --------------------------------------------------------------------------------------------
# to_square
# --------------------------------------------------------------------------------------------


def test_to_square_wide_centre_crop_exact():
    h, w = 20, 40
    label = (np.arange(h)[:, None] * 40 + np.arange(w)[None, :]).astype(np.uint16)  # unique values
    image = _rgb(h, w)
    img, lab = to_square(image, label, 10)
    assert img.shape == (10, 10, 3) and img.dtype == np.uint8
    assert lab.shape == (10, 10) and lab.dtype == np.uint16
    # resized to 10x20 (nearest picks source pixel 2*i+1), crop offset (20-10)//2 = 5 columns
    assert np.array_equal(lab, label[1::2, 11:31:2])
    assert set(np.unique(lab)) <= set(np.unique(label))
    # the image crop is the centre of the bilinear resize
    full = np.asarray(Image.fromarray(image).resize((20, 10), Image.Resampling.BILINEAR))
    assert np.array_equal(img, full[:, 5:15])


def test_to_square_tall_and_label_values():
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 3, 9, 255], np.uint8), size=(45, 30))
    img, lab = to_square(_rgb(45, 30), label, 16)
    assert img.shape == (16, 16, 3) and lab.shape == (16, 16)
    assert set(np.unique(lab)) <= {0, 3, 9, 255}
    # short side 30 -> 16, long 45 -> 24, crop rows (24-16)//2 = 4
    rows = np.floor((np.arange(24) + 0.5) * 45 / 24).astype(int)[4:20]
    cols = np.floor((np.arange(16) + 0.5) * 30 / 16).astype(int)
    assert np.array_equal(lab, label[rows][:, cols])


def test_to_square_identity_and_none_label():
    image, label = _rgb(12, 12), np.zeros((12, 12), np.uint8)
    img, lab = to_square(image, label, 12)
    assert np.array_equal(img, image) and np.array_equal(lab, label)
    img, lab = to_square(_rgb(6, 9), None, 12)  # upscaling works too
    assert img.shape == (12, 12, 3) and lab is None


# --------------------------------------------------------------------------------------------
# Synthetic domain
# --------------------------------------------------------------------------------------------

SMALL = dict(n_unlabeled=4, n_labeled=3, n_test=3)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(tmp_path):
    a = make_synthetic(tmp_path / "a", seed=3, **SMALL)
    make_synthetic(tmp_path / "b", seed=3, **SMALL)
    make_synthetic(tmp_path / "c", seed=4, **SMALL)
    ta, tb, tc = (_tree_bytes(tmp_path / n) for n in "abc")
    assert ta == tb
    assert ta.keys() - {"classes.yaml"} == tc.keys() - {"classes.yaml"}
    assert all(ta[k] != tc[k] for k in ta if k.endswith(".png"))
    assert a["counts"] == {"train": 3, "test": 3, "unlabeled": 4} and not a["reused"]
    assert abs(sum(a["class_pixel_fractions"].values()) - 1) < 1e-3
    # an image depends only on (seed, split, index): other counts keep the same files
    make_synthetic(tmp_path / "d", seed=3, n_unlabeled=2, n_labeled=5, n_test=1)
    td = _tree_bytes(tmp_path / "d")
    for k in ("real/train/train_0002.png", "real/train/train_0002.npy", "real/test/test_0000.png",
              "unlabeled/unl_00001.png"):
        assert td[k] == ta[k], k
    # the splits are disjoint samples
    assert len({ta["real/train/train_0000.png"], ta["real/test/test_0000.png"], ta["unlabeled/unl_00000.png"]}) == 3


def test_synthetic_readable_by_ddpmseg(tmp_path):
    seen = []
    make_synthetic(tmp_path / "syn", seed=1, progress=seen.append, **SMALL)
    assert seen == list(range(1, 11))
    root = tmp_path / "syn"
    doc = yaml.safe_load((root / "classes.yaml").read_text())
    assert doc["classes"] == SYNTHETIC_CLASSES and doc["num_classes"] == 7
    assert doc["ignore_index"] == 255 and doc["image_size"] == 32 and doc["seed"] == 1
    counts = {"train": 3, "test": 3, "unlabeled": 4}
    for split, n in counts.items():
        r = DDPMSegFolder(root, split)
        assert len(r) == n and r.num_classes == 7 and r.class_names == SYNTHETIC_CLASSES
        s = r[0]
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        if split == "unlabeled":
            assert s.label is None and s.id == "unl_00000"
        else:
            assert s.label.dtype == np.uint8 and s.label.shape == (32, 32) and s.id == f"{split}_0000"
            img, lab = synthetic_sample(1, split, 0, 32)
            assert np.array_equal(s.image, img) and np.array_equal(s.label, lab)


def test_synthetic_rerun_rebuild_and_refuse(tmp_path):
    out = tmp_path / "syn"
    make_synthetic(out, **SMALL)
    probe = out / "real" / "train" / "train_0000.png"
    stamp = probe.stat().st_mtime_ns
    again = make_synthetic(out, **SMALL)
    assert again["reused"] and probe.stat().st_mtime_ns == stamp
    rebuilt = make_synthetic(out, n_unlabeled=2, n_labeled=2, n_test=1)
    assert not rebuilt["reused"] and len(DDPMSegFolder(out, "unlabeled")) == 2
    assert not (out / "real" / "train" / "train_0002.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no partial / old folders left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        make_synthetic(other, **SMALL)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="image_size"):
        make_synthetic(tmp_path / "x", image_size=48)


def test_synthetic_resumes_interrupted_build(tmp_path):
    out = tmp_path / "syn"

    def stop_after_5(n):
        if n == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_synthetic(out, progress=stop_after_5, **SMALL)
    assert not out.exists()
    partial = tmp_path / ".syn.partial"
    written = {p: p.stat().st_mtime_ns for p in partial.rglob("*.png")}
    assert len(written) == 5
    make_synthetic(out, **SMALL)
    assert not partial.exists()
    for p, stamp in written.items():
        q = out / p.relative_to(partial)
        assert q.stat().st_mtime_ns == stamp  # kept, not rewritten
    make_synthetic(tmp_path / "fresh", **SMALL)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "fresh")


def _samples(n: int, size: int = 32, seed: int = 0):
    return [synthetic_sample(seed, "train", i, size) for i in range(n)]


def test_synthetic_classes_present():
    samples = _samples(20)
    assert len(SYNTHETIC_CLASSES) == 7
    present = np.zeros(7, int)
    for img, lab in samples:
        assert img.shape == (32, 32, 3) and lab.shape == (32, 32) and lab.dtype == np.uint8
        present += np.bincount(lab.ravel(), minlength=7) >= 2
    assert set(np.unique(np.concatenate([lab.ravel() for _, lab in samples[:5]]))) == set(range(7))
    assert np.all(present >= 16), dict(zip(SYNTHETIC_CLASSES, present))  # each part in >= 80%
    img64, lab64 = synthetic_sample(0, "test", 0, 64)
    assert img64.shape == (64, 64, 3) and lab64.shape == (64, 64)


def test_synthetic_colour_does_not_give_class():
    samples = _samples(20, seed=5)
    x = np.concatenate([img.reshape(-1, 3) for img, _ in samples]).astype(np.float64)
    y = np.concatenate([lab.ravel() for _, lab in samples])
    means = np.stack([x[y == c].mean(0) for c in range(7)])
    pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    balanced = np.mean([(pred[y == c] == c).mean() for c in range(7)])
    assert balanced < 0.6, balanced
    # per-class colour ranges (10th..90th percentile) overlap heavily for confusable pairs
    for c1, c2 in (("hair", "brows"), ("skin", "mouth"), ("skin", "nose"), ("background", "skin"),
                   ("background", "hair")):
        i1, i2 = SYNTHETIC_CLASSES.index(c1), SYNTHETIC_CLASSES.index(c2)
        p1 = np.percentile(x[y == i1], [10, 90], axis=0)
        p2 = np.percentile(x[y == i2], [10, 90], axis=0)
        inter = np.clip(np.minimum(p1[1], p2[1]) - np.maximum(p1[0], p2[0]), 0, None)
        smaller = np.minimum(p1[1] - p1[0], p2[1] - p2[0])
        assert np.all(inter >= 0.5 * smaller), (c1, c2, inter, smaller)


def test_synthetic_sample_is_pure():
    a = synthetic_sample(7, "unlabeled", 12)
    b = synthetic_sample(7, "unlabeled", 12)
    c = synthetic_sample(7, "unlabeled", 13)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    with pytest.raises(DataError):
        synthetic_sample(0, "val", 0)
    assert os.sep not in SYNTHETIC_CLASSES[0]
