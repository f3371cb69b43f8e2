"""The Python API: ``ddps.load(workspace, model=..., device=...)`` in one call; the segmenter
takes numpy arrays (RGB, grey, RGBA) and PIL images and returns masks at their size; the
workspace's relative paths are the workspace's; ``import ddps`` imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddps
from ddps_core.errors import ConfigError, DataError
from ddps_core.inference import Prediction
from ddps_core.predict import run
from tests.predict.fakes import NAMES, FakePredictor, fake_labels, quadrants

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def loaded(monkeypatch):
    """The loader seam returns a fake predictor and records what it was asked for."""
    calls = []

    def load(settings, model, device=None):
        calls.append((settings, model, device))
        return FakePredictor(model=model)

    monkeypatch.setattr(run, "_load", load)
    return calls


def test_load_then_call_on_arrays_and_pil_images(loaded, tmp_path):
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / "params.yaml").write_text("device: cuda\nstudent:\n  out: models/student\nrefiner:\n  out: /abs/refiner\n")
    seg = ddps.load(ws, model="refiner", device="cpu")
    (settings, model, device), = loaded
    assert (model, device, settings.device) == ("refiner", "cpu", "cpu")  # device= over the file's
    assert settings.student.out == str(ws / "models/student") and settings.refiner.out == "/abs/refiner"
    assert settings.teacher.out == str(ws / "data/models/teacher")  # defaults are the workspace's too
    assert seg.class_names == NAMES and seg.num_classes == 4 and seg.model == "refiner"

    rgb = quadrants(64, 96)
    mask = seg(rgb)
    assert isinstance(mask, np.ndarray) and mask.shape == (64, 96) and np.array_equal(mask, fake_labels(rgb))
    assert np.array_equal(seg(Image.fromarray(rgb)), mask)  # a PIL image
    rgba = np.concatenate([rgb, np.zeros((64, 96, 1), np.uint8)], axis=2)
    assert np.array_equal(seg(rgba), mask)  # alpha dropped
    assert np.array_equal(seg(Image.fromarray(rgba, "RGBA")), mask)
    grey = rgb[..., 1]
    assert np.array_equal(seg(grey), fake_labels(np.repeat(grey[..., None], 3, 2)))  # grey: R = G = B
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    assert np.array_equal(seg(tmp_path / "photo.png"), mask)  # a file path

    pred = seg.predict(rgb)
    assert isinstance(pred, Prediction) and pred.uncertainty.shape == (64, 96)
    assert pred.score == pytest.approx(rgb[..., 2].mean() / 255, rel=1e-5)
    assert [p.labels.shape for p in seg.predict_many([rgb, grey[:10, :7]])] == [(64, 96), (10, 7)]
    with pytest.raises(ValueError, match="float64"):
        seg(rgb / 255.0)


def test_class_names_default_to_class_ids_and_params_can_point_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "_load", lambda s, m, device=None: FakePredictor(model=m, class_names=None))
    ws = tmp_path / "ws"
    ws.mkdir()
    other = tmp_path / "elsewhere.yaml"
    other.write_text("data:\n  resize: slide\n")
    seg = ddps.load(ws, params=other)
    assert seg.settings.data.resize == "slide" and seg.model == "student"
    assert seg.class_names == ["class 0", "class 1", "class 2", "class 3"]
    with pytest.raises(ConfigError, match="params.yaml: settings file not found"):
        ddps.load(ws)
    with pytest.raises(ConfigError, match="--model 'unet'"):
        ddps.load(ws, model="unet", params=other)


def test_a_missing_model_names_its_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("device: cpu\n")
    with pytest.raises(DataError, match=r"student\.safetensors: not found: the student needs stage train_student"):
        ddps.load(tmp_path)


def test_import_ddps_is_cheap():
    code = ("import sys, ddps; assert callable(ddps.load); import ddps.api, ddps.cli; "
            "bad = [m for m in ('torch', 'prefect', 'pandas') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
