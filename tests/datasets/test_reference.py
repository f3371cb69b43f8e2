"""The DDPM-Seg datasets by name: ``data.dataset`` and ``data.root`` are all a user writes. The
folders are built here in the reference's layout (``real/{train,test}/<id>.png`` with
``<id>.npy`` beside it, no classes.yaml, no pool, and an extra folder such as the released
``real/orig_train_0``), with tiny images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ddps.cli import main
from ddps_core.config import load_settings, parse_settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.datasets.reference import REFERENCE_DATASETS
from ddps_core.errors import ConfigError
from ddps_core.metrics import ConfusionAccumulator

# (K, ignore label, first class name, last class name) as experiments/<name>/ddpm.json and
# src/data_util.py of yandex-research/ddpm-segmentation give them
REFERENCE = {
    "ffhq_34": (34, 255, "background", "head***wrinkles"),
    "bedroom_28": (29, 0, "background", "table staff"),
    "cat_15": (15, 255, "background", "neck"),
    "horse_21": (21, 255, "background", "leg protection"),
    "celeba_19": (19, 255, "background", "u_lip"),
    "ade_bedroom_30": (30, 255, "wall", "television"),
}


def test_the_registry_holds_the_reference_facts():
    assert set(REFERENCE_DATASETS) == set(REFERENCE)
    for name, (k, ignore, first, last) in REFERENCE.items():
        ref = REFERENCE_DATASETS[name]
        assert (ref.num_classes, ref.ignore_index, ref.classes[0], ref.classes[-1]) == (k, ignore, first, last)
        assert len(ref.palette) == k and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ref.palette)
        assert len(set(ref.classes)) == k
    assert REFERENCE_DATASETS["bedroom_28"].scored_classes == 28  # the name counts the scored classes
    assert REFERENCE_DATASETS["ffhq_34"].palette[1] == (112, 130, 107)  # int(0.4420*255), int(0.5100*255), ...
    assert REFERENCE_DATASETS["bedroom_28"].palette[28] == (0, 0, 53)


def _reference_folder(root: Path, k: int, n_train: int, n_test: int, size: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / "real" / split
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{split}_{i}.png")
            np.save(folder / f"{split}_{i}.npy", rng.integers(0, k, (size, size)).astype(np.uint8))
    (root / "real" / "orig_train_0").mkdir()
    (root / "real" / "orig_train_0" / "log.txt").write_text("sampling...\n")
    return root


def _prepare(tmp_path: Path, monkeypatch, capsys, name: str, root: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"dataset": name, "root": str(root)}}))
    with pytest.raises(SystemExit) as done:
        main(["data", "prepare", "--params", str(params)])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err
    return tmp_path / "data" / "dataset"


@pytest.mark.parametrize("name", ["ffhq_34", "bedroom_28"])
def test_import_by_name_with_only_dataset_and_root(tmp_path, monkeypatch, capsys, name):
    k, ignore, *_ = REFERENCE[name]
    root = _reference_folder(tmp_path / name, k, n_train=3, n_test=2)
    out = _prepare(tmp_path, monkeypatch, capsys, name, root)
    doc = yaml.safe_load((out / "classes.yaml").read_text())
    ref = REFERENCE_DATASETS[name]
    assert doc["classes"] == list(ref.classes) and doc["num_classes"] == k and doc["ignore_index"] == ignore
    assert doc["dataset"] == name and [tuple(c) for c in doc["palette"]] == list(ref.palette)
    assert doc["summary"]["counts"] == {"train": 3, "test": 2}
    for split in ("train", "test"):
        reader = DDPMSegFolder(out, split, ignore_index=ignore)
        assert reader.num_classes == k and reader.class_names == list(ref.classes)
        for i, sid in enumerate(reader.ids):
            np.testing.assert_array_equal(reader[i].label, np.load(root / "real" / split / f"{sid}.npy"))
    fractions = doc["summary"]["class_pixel_fractions"]
    if ignore < k:
        assert fractions[ref.classes[ignore]] == 0.0  # the ignored class is no labelled pixel
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-4)
    settings = load_settings(tmp_path / "params.yaml")
    assert (settings.data.source, settings.data.num_classes, settings.data.ignore_index) == ("ddpm-seg", k, ignore)


def test_the_import_says_which_folders_and_counts_differ_from_the_reference(tmp_path, monkeypatch, capsys):
    root = _reference_folder(tmp_path / "bedroom_28", 29, n_train=3, n_test=2)
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"dataset": "bedroom_28", "root": str(root)}}))
    with pytest.raises(SystemExit) as done:
        main(["data", "prepare", "--params", str(params)])
    said = capsys.readouterr().err
    assert done.value.code == 0
    assert "orig_train_0: split folder not imported" in said
    assert "3 train images; the DDPM-Seg reference uses the first 40 of bedroom_28" in said


def test_bedroom_28_scores_without_its_ignored_class(tmp_path, monkeypatch, capsys):
    """The imported settings (K = 29, ignore 0) score a hand case: class 0 counts nowhere."""
    root = tmp_path / "bedroom_28"
    for split in ("train", "test"):
        (root / "real" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(root / "real" / split / "a.png")
    np.save(root / "real" / "train" / "a.npy", np.ones((2, 4), np.uint8))
    np.save(root / "real" / "test" / "a.npy", np.array([[0, 1, 1, 2], [0, 2, 3, 3]], np.uint8))
    out = _prepare(tmp_path, monkeypatch, capsys, "bedroom_28", root)
    settings = load_settings(tmp_path / "params.yaml")
    truth = DDPMSegFolder(out, "test", ignore_index=settings.data.ignore_index)[0].label
    acc = ConfusionAccumulator(settings.data.num_classes, ignore_index=settings.data.ignore_index)
    acc.update(np.array([[1, 1, 0, 2], [2, 2, 3, 1]]), truth)
    result = acc.result()
    # class 1: I 1 / U 3, class 2: 2 / 2, class 3: 1 / 2 (tests/metrics/test_ignored_class.py);
    # counting class 0 (predicted once on a class-1 pixel) as an IoU of 0 would give 11/24
    assert result.miou == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert np.isnan(result.iou[0])


def test_settings_that_contradict_the_reference_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.ignore_index is 255, but data\.dataset 'bedroom_28' has ignore_index 0"):
        parse_settings({"data": {"dataset": "bedroom_28", "root": "/d", "ignore_index": 255}})
    with pytest.raises(ConfigError, match=r"data\.source is 'folder', but data\.dataset 'ffhq_34' has source 'ddpm-seg'"):
        parse_settings({"data": {"dataset": "ffhq_34", "root": "/d", "source": "folder"}})
    with pytest.raises(ConfigError, match=r"data\.num_classes is 28, but data\.dataset 'bedroom_28' has num_classes 29"):
        parse_settings({"data": {"dataset": "bedroom_28", "root": "/d", "num_classes": 28}})
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        parse_settings({"data": {"dataset": "bedroom_18", "root": "/d"}})
    with pytest.raises(ConfigError, match=r"data\.root is required"):
        parse_settings({"data": {"dataset": "cat_15"}})
    ok = parse_settings({"data": {"dataset": "cat_15", "root": "/d", "ignore_index": 255, "source": "ddpm-seg"}})
    assert ok.data.num_classes == 15
