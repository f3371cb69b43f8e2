"""The real teacher of a tiny workspace (no fakes) through the Python API and `ddps predict`:
images of mixed sizes and formats come back at their own sizes, with overlays, uncertainty
maps and the table."""

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import ddps
from ddps.cli import app
from ddps_core import stages
from ddps_core.config import parse_settings
from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    raw = tiny_project(root, {"n_unlabeled": 0, "n_labeled": 4, "n_test": 1},
                       features={"steps": [10], "blocks": [1, 2], "shard_images": 4, "batch_size": 4,
                                 "out": str(root / "f")},
                       teacher={"baselines": [], "members": 2, "max_epochs": 1, "out": str(root / "teacher"),
                                "min_class_pixels": 1})
    s = parse_settings(raw)
    stages.get("extract").run(s)
    stages.get("train_teacher").run(s)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.mark.parametrize("resize", ["whole", "slide"])
def test_the_api_labels_arrays_at_their_own_size(workspace, resize):
    # device "auto", as params.yaml has it: the CPU here
    seg = ddps.load(workspace, model="teacher", device="auto", overrides={"data.resize": resize})
    rng = np.random.default_rng(0)
    for shape in [(64, 96, 3), (160, 64, 3), (32, 32)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = seg(image)
        assert mask.shape == shape[:2] and mask.dtype == np.uint8 and mask.max() < 7
        pred = seg.predict(image)
        assert np.array_equal(pred.labels, mask) and pred.uncertainty.shape == shape[:2]
        assert 0 <= pred.score <= np.log(2) + 1e-6


def test_ddps_predict_on_a_folder_of_mixed_sizes_and_formats(workspace, tmp_path, monkeypatch):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.integers(0, 256, (160, 64, 3), dtype=np.uint8)).save(images / "tall.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(images / "gray.webp")
    monkeypatch.chdir(workspace)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(images), "--model", "teacher", "--out", str(out),
                                      "--overlay", "--uncertainty"])
    assert result.exit_code == 0, result.output
    sizes = {"wide": (96, 64), "tall": (64, 160), "gray": (40, 40)}
    for name, size in sizes.items():
        assert Image.open(out / "masks" / f"{name}.png").size == size
        assert (out / "uncertainty" / f"{name}.png").is_file()
        assert any(p.name.startswith(name) for p in (out / "overlays").iterdir())
    table = pd.read_parquet(out / "predictions.parquet")
    assert len(table) == 3 and set(table["model"]) == {"teacher"}
