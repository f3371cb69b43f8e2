"""``student.source: labelled``: the segmentor trains on the dataset's own labelled split at its
own resolution, with mmsegmentation's random resize, crop and flip (the supervised setting of
DDPS). Tiny ADE20K and Cityscapes folders in their real layouts, non-square, train a
MobileNetV2 DeepLabV3+ and a MiT-B0 SegFormer for two steps through the stage; the DDPS refiner
then trains on each and refines its test predictions, scored at the labels' own size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.datasets.stage import prepare_dataset
from ddps_core.student.labelled import LabelledCrops, random_crop_box, rescale_size

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(0)


def _ade20k(root: Path, h: int = 40, w: int = 56) -> Path:
    for split, n in (("training", 3), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(RNG.integers(0, 151, (h, w), dtype=np.uint8)).save(root / "annotations" / split / f"{name}.png")
    return root


def _cityscapes(root: Path, h: int = 32, w: int = 64) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            city = "aachen" if split == "train" else "frankfurt"
            name = f"{city}_{i:06d}_000019"
            img = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
            lab = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            lab.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
            Image.fromarray(RNG.integers(0, 34, (h, w), dtype=np.uint8)).save(lab)
    return root


@pytest.mark.parametrize("recipe, make, arch, encoder", [
    ("ddps-ade20k-deeplabv3plus", _ade20k, "deeplabv3plus", "mobilenet_v2"),
    ("ddps-cityscapes-segformer", _cityscapes, "segformer", "mit_b0"),
])
def test_labelled_training_through_the_stage(tmp_path, recipe, make, arch, encoder):
    root = make(tmp_path / "raw")
    s = parse_settings({
        "recipe": recipe, "device": "cpu",
        "data": {"root": str(root), "out": str(tmp_path / "dataset")},
        # the recipe's crops, scales and budget, shrunk to a test (the rest is the recipe's)
        "student": {"encoder": encoder, "crop_size": [32, 48], "base_scale": [64, 32], "iterations": 2,
                    "batch_size": 2, "warmup_steps": 1, "out": str(tmp_path / "student")},
    })
    assert (s.student.source, s.student.arch, s.student.selection) == ("labelled", arch, "last")
    assert s.student_train_data() == str(tmp_path / "dataset" / "real" / "train")
    prepare_dataset(s.data)
    summary = stages.get("train_student").run(s)
    info = json.loads((tmp_path / "student" / "model.json").read_text())
    assert (info["arch"], info["encoder"], info["source"], info["iterations"]) == (arch, encoder, "labelled", 2)
    assert info["crop_size"] == [32, 48] and info["select_on"] == "last" and info["n_train"] == 3
    assert info["num_classes"] == (150 if "ade20k" in recipe else 19)
    assert np.isfinite(summary["test_miou"])
    state = torch.load(tmp_path / "student" / "state.pt", weights_only=True)
    opt = state["optimizer"]["param_groups"]
    if arch == "deeplabv3plus":  # SGD, momentum 0.9, the head at the encoder's rate
        assert all(g["momentum"] == 0.9 for g in opt) and {g["lr_mult"] for g in opt} == {1.0}
    else:  # AdamW, the decoder and head at 10x, no decay on the norms
        assert {g["lr_mult"] for g in opt} == {1.0, 10.0} and 0.0 in {g["weight_decay"] for g in opt}
    # 3 images in batches of 2: one step per epoch, so 2 iterations are 2 epochs (header + 2 rows)
    assert len((tmp_path / "student" / "history.csv").read_text().splitlines()) == 3 and info["epochs"] == 2

    # the refiner on top of that segmentor, trained on the real labelled images, and its step
    # table on the test split at the labels' own (non-square) size
    s = parse_settings({**s.model_dump(mode="json"), "refiner": {
        **s.refiner.model_dump(mode="json"), "data": "real", "steps": 2, "single_step_steps": 1, "batch_size": 2,
        "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1, "out": str(tmp_path / "refiner"),
        "refined_out": str(tmp_path / "refined")},
        "evaluate": {**s.evaluate.model_dump(mode="json"), "reports": str(tmp_path / "reports")}})
    assert s.refiner.num_timesteps == 20  # the recipe's T
    stages.get("train_refiner").run(s)
    table = stages.get("refine").run(s)["steps"]
    refiner = next(row for row in table if row["method"] == "refiner")
    assert [k for k in refiner if k.startswith("mIoU ")] == ["mIoU 0", "mIoU 10", "mIoU 19"]
    assert all(np.isfinite(refiner[k]) for k in ("mIoU 0", "mIoU 10", "mIoU 19", "mBIoU 19"))
    report = pd.read_parquet(tmp_path / "reports" / "refine.parquet")
    test = DDPMSegFolder(s.data.out, "test")
    labelled = sum(int((x.label != s.data.ignore_index).sum()) for x in test)  # every pixel of the labels but the ignored
    assert labelled > 0 and all(x.label.shape != (x.label.shape[0],) * 2 for x in test)
    for (method, step), block in report.query("scope == 'class'").groupby(["method", "step"], dropna=False):
        assert int(block["area_label"].sum()) == labelled, (method, step)


def test_rescale_follows_mmcv_imrescale():
    # 40 x 56 to fit (64, 32) at ratio 1: f = min(64 / 56, 32 / 40) = 0.8 -> 32 x int(44.8 + 0.5)
    assert rescale_size(40, 56, 1.0, (64, 32)) == (32, 45)
    # ratio 0.5: (32, 16): f = min(32 / 56, 16 / 40) = 0.4 -> 16 x int(22.4 + 0.5)
    assert rescale_size(40, 56, 0.5, (64, 32)) == (16, 22)
    # 1024 x 2048 Cityscapes at ratio 1.5 of (2048, 1024): f = min(3072 / 2048, 1536 / 1024) = 1.5
    assert rescale_size(1024, 2048, 1.5, (2048, 1024)) == (1536, 3072)
    assert rescale_size(10, 20, 2.0, None) == (20, 40)


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    """A 4 x 8 label, left half class 1, right half class 2, 4 x 4 crops at x = 0..4: the
    dominant class covers 1, 3/4, 1/2, 3/4, 1 of the crop, so only x = 2 is below 0.75. A crop
    is checked at most 10 times and the 11th draw is kept as it is: P(x = 2) = 1 - 0.8^11."""
    label = np.array([[1] * 4 + [2] * 4] * 4)
    at = [random_crop_box(label, (4, 4), np.random.default_rng(k), 255, 0.75)[2] for k in range(1000)]
    assert 0.89 < at.count(2) / 1000 < 0.94  # 1 - 0.8 ** 11 = 0.914
    free = [random_crop_box(label, (4, 4), np.random.default_rng(k), 255, None)[2] for k in range(1000)]
    assert 0.16 < free.count(2) / 1000 < 0.24  # uniform over 5 offsets
    # ignore pixels are no class: columns 0-3 ignored, 4-5 class 3, 6-7 class 4. x = 2 holds one
    # class (rejected; counting the ignore pixels as a class would accept it), x = 3 and 4 pass
    half = np.array([[255] * 4 + [3, 3, 4, 4]] * 4)
    at = [random_crop_box(half, (4, 4), np.random.default_rng(k), 255, 0.75)[2] for k in range(500)]
    assert at.count(3) + at.count(4) > 490 and at.count(2) <= 5


def test_crops_are_padded_with_the_ignore_index_and_drawn_from_the_seed(tmp_path):
    class Reader:
        ids = ["a"]

        def __getitem__(self, i):
            from ddps_core.datasets import Sample

            return Sample(np.full((40, 56, 3), 9, np.uint8), np.ones((40, 56), np.uint8), "a")

    crops = LabelledCrops(Reader(), (32, 48), base_scale=(64, 32), ratio_range=(1.0, 1.0), cat_max_ratio=None,
                          hflip=False, ignore_index=255)
    image, label = crops.crop_pair(0, np.random.default_rng(0))
    # rescaled to 32 x 45 (test_rescale_follows_mmcv_imrescale), so columns 45..47 are padding
    assert image.shape == (32, 48, 3) and (image[:, :45] == 9).all() and (image[:, 45:] == 0).all()
    assert (label[:, :45] == 1).all() and (label[:, 45:] == 255).all()
    a = LabelledCrops(Reader(), (16, 16), base_scale=None, ratio_range=(0.5, 2.0), cat_max_ratio=None,
                      hflip=True, ignore_index=255)
    x1, _ = a.batch([0, 0], np.random.default_rng(5))
    x2, _ = a.batch([0, 0], np.random.default_rng(5))
    assert torch.equal(x1, x2) and x1.shape == (2, 3, 16, 16)
