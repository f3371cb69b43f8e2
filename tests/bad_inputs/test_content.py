"""The import's identity is the content of the files it reads: new content under the same
file names is imported, unchanged content leaves the earlier import as it was (bytes and
modification times), and a build folder left by an import of other content is not resumed.
(``tests/bad_inputs/test_dvc.py`` runs the same under ``dvc repro``; the DDPM's own restart on
new image content is in ``tests/test_ddpm_train.py``.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.bad_inputs.conftest import image_array, snapshot


def _relabel_keeping_times(path: Path, label: np.ndarray) -> None:
    """New content under the same name and with the old modification time (``cp -p``)."""
    st = path.stat()
    np.save(path, label)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_unchanged_content_reuses_the_import_untouched(imported, cli):
    root, out, params = imported
    before = snapshot(out)
    res = cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    assert "(reused)" in res.err + res.out
    assert snapshot(out) == before


def test_new_content_under_the_same_names_is_imported(imported, cli):
    root, out, params = imported
    new_label = np.full((8, 8), 2, np.uint8)
    new_image = image_array(8, 77)
    _relabel_keeping_times(root / "real" / "train" / "train_0.npy", new_label)
    png = root / "real" / "test" / "test_1.png"
    st = png.stat()
    Image.fromarray(new_image).save(png)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    assert "(reused)" not in res.err + res.out
    np.testing.assert_array_equal(np.load(out / "real" / "train" / "train_0.npy"), new_label)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "real" / "test" / "test_1.png")), new_image)


def test_a_build_left_by_an_import_of_other_content_is_not_resumed(tmp_path, cli, monkeypatch):
    """An import stops half-way (a disk hiccup); the user fixes a label it had already copied
    into its build folder, under the same name; the next import must not keep the old copy."""
    import ddps_core.datasets.stage as data_stage
    from tests.bad_inputs.conftest import import_params, make_user_dataset

    root = make_user_dataset(tmp_path / "user")
    out = tmp_path / "dataset"
    params = import_params(tmp_path, root, out)
    real, calls = data_stage.atomic_write_bytes, []

    def hiccup(path, data):
        calls.append(path.name)
        if len(calls) == 5:
            raise OSError(5, "Input/output error")
        real(path, data)

    monkeypatch.setattr(data_stage, "atomic_write_bytes", hiccup)
    assert cli("data", "prepare", "--params", params).code == 1
    monkeypatch.undo()
    partial = tmp_path / ".dataset.partial" / "real" / "train" / "train_0.npy"
    assert partial.is_file()  # copied before the hiccup
    fixed = np.ones((8, 8), np.uint8)
    _relabel_keeping_times(root / "real" / "train" / "train_0.npy", fixed)
    res = cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    np.testing.assert_array_equal(np.load(out / "real" / "train" / "train_0.npy"), fixed)


@pytest.mark.parametrize("change", ["classes", "extra_image"])
def test_other_inputs_of_the_import_count_too(imported, cli, change):
    """The class file and a new image are inputs as much as the labels are."""
    root, out, params = imported
    if change == "classes":
        (root / "classes.yaml").write_text("classes: [background, thing, other-stuff]\n")
    else:
        Image.fromarray(image_array(8, 5)).save(root / "real" / "test" / "test_9.png")
        np.save(root / "real" / "test" / "test_9.npy", np.zeros((8, 8), np.uint8))
    res = cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    assert "(reused)" not in res.err + res.out
    if change == "classes":
        assert "other-stuff" in (out / "classes.yaml").read_text()
    else:
        assert (out / "real" / "test" / "test_9.png").is_file()
