"""The data stage: synthetic passthrough, import of user data, resume, refusal to clobber."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from ddps_core.config import parse_settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.datasets.stage import prepare_dataset
from ddps_core.errors import DataError


def _folder_dataset(root, n_train=3, n_test=2, k=4):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)  # non-square kept as is
            lab = rng.integers(0, k, (6, 9), dtype=np.uint8)
            lab[0, 0] = 255
            Image.fromarray(img).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(lab).save(root / split / "masks" / f"{split}{i}.png")
    return root


def _settings(tmp_path, root, **extra):
    return parse_settings({"data": {"source": "folder", "root": str(root),
                                    "out": str(tmp_path / "out"), "num_classes": 4, **extra}}).data


def test_import_writes_canonical_layout_losslessly(tmp_path):
    root = _folder_dataset(tmp_path / "src")
    summary = prepare_dataset(_settings(tmp_path, root))
    assert summary["counts"] == {"train": 3, "test": 2}
    for split in ("train", "test"):
        reader = DDPMSegFolder(tmp_path / "out", split)
        assert reader.num_classes == 4
        for sample in reader:
            src_img = np.asarray(Image.open(root / split / "images" / f"{sample.id}.png"))
            src_lab = np.asarray(Image.open(root / split / "masks" / f"{sample.id}.png"))
            assert np.array_equal(sample.image, src_img)
            assert np.array_equal(sample.label, src_lab)
    doc = yaml.safe_load((tmp_path / "out" / "classes.yaml").read_text())
    assert doc["prepared"]["source"] == "folder"
    # the build folder is gone; the hash cache of the sources stays beside (not in) the output
    assert [p.name for p in tmp_path.glob(".out.*")] == [".out.sources.json"]


def test_import_stops_at_the_bad_file_and_keeps_previous_output(tmp_path):
    root = _folder_dataset(tmp_path / "src")
    prepare_dataset(_settings(tmp_path, root))
    before = sorted(p.name for p in (tmp_path / "out" / "real" / "train").iterdir())
    lab = np.zeros((6, 9), np.uint8)
    lab[2, 2] = 9  # >= num_classes, not ignore
    Image.fromarray(lab).save(root / "train" / "masks" / "train1.png")
    with pytest.raises(DataError, match=r"train1\.png"):
        prepare_dataset(_settings(tmp_path, root))
    after = sorted(p.name for p in (tmp_path / "out" / "real" / "train").iterdir())
    assert before == after  # earlier output untouched


def test_import_resumes_in_partial_folder(tmp_path, monkeypatch):
    root = _folder_dataset(tmp_path / "src", n_train=4)
    data = _settings(tmp_path, root)
    import ddps_core.datasets.stage as prep

    calls = []
    real = prep.atomic_write_bytes

    def flaky(path, payload):
        calls.append(path.name)
        if len(calls) == 5:
            raise OSError("disk hiccup")
        real(path, payload)

    monkeypatch.setattr(prep, "atomic_write_bytes", flaky)
    with pytest.raises(OSError):
        prepare_dataset(data)
    assert not (tmp_path / "out").exists()
    written = len(calls) - 1
    calls.clear()
    monkeypatch.setattr(prep, "atomic_write_bytes", lambda p, b: (calls.append(p.name), real(p, b)))
    prepare_dataset(data)
    assert len(calls) == 2 * 6 - written  # only the files not yet written


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    root = _folder_dataset(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_dataset(_settings(tmp_path, root))
    assert (tmp_path / "out" / "precious.txt").read_text() == "mine"


def test_synthetic_source(tmp_path):
    data = parse_settings({"data": {"out": str(tmp_path / "syn"), "synthetic": {
        "n_unlabeled": 3, "n_labeled": 2, "n_test": 2}}}).data
    summary = prepare_dataset(data)
    assert summary["counts"] == {"train": 2, "test": 2, "unlabeled": 3}
    assert len(DDPMSegFolder(tmp_path / "syn", "unlabeled")) == 3
    assert json.dumps(summary)  # JSON-serialisable (flows return it)


def _ddpm_seg_dataset(root, extra_split=None):
    """A DDPM-Seg layout folder: real/train (2), real/test (1), unlabeled (3) of 8x8 images."""
    rng = np.random.default_rng(1)
    for split, n in (("real/train", 2), ("real/test", 1), ("unlabeled", 3), *([(extra_split, 1)] if extra_split else [])):
        folder = root / split
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{folder.name}{i}.png")
            if split != "unlabeled":
                np.save(folder / f"{folder.name}{i}.npy", rng.integers(0, 3, (8, 8), dtype=np.uint8))
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c"]}))
    return root


def test_a_ddpm_seg_folder_imports_all_three_splits_with_source_and_root_alone(tmp_path):
    root = _ddpm_seg_dataset(tmp_path / "src")
    data = parse_settings({"data": {"source": "ddpm-seg", "root": str(root), "out": str(tmp_path / "out")}}).data
    warnings = []
    summary = prepare_dataset(data, warn=warnings.append)
    assert summary["counts"] == {"train": 2, "test": 1, "unlabeled": 3}
    assert len(DDPMSegFolder(tmp_path / "out", "unlabeled")) == 3 and warnings == []


def test_a_split_folder_present_but_not_imported_is_named(tmp_path):
    root = _ddpm_seg_dataset(tmp_path / "src", extra_split="real/val")
    data = parse_settings({"data": {"source": "ddpm-seg", "root": str(root), "out": str(tmp_path / "out")}}).data
    warnings = []
    prepare_dataset(data, warn=warnings.append)
    assert warnings == [f"{root / 'real' / 'val'}: split folder not imported (data.splits maps no train / test / "
                        "unlabeled split to 'val')"]


def test_without_an_unlabeled_folder_the_import_goes_on_but_a_named_split_must_exist(tmp_path):
    root = _ddpm_seg_dataset(tmp_path / "src")
    import shutil

    shutil.rmtree(root / "unlabeled")
    data = parse_settings({"data": {"source": "ddpm-seg", "root": str(root), "out": str(tmp_path / "a")}}).data
    assert prepare_dataset(data)["counts"] == {"train": 2, "test": 1}
    named = parse_settings({"data": {"source": "ddpm-seg", "root": str(root), "out": str(tmp_path / "b"),
                                     "splits": {"unlabeled": "unlabeled"}}}).data
    with pytest.raises(DataError, match="unlabeled"):
        prepare_dataset(named)
