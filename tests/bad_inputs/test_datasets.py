"""Bad user datasets: ``ddps data check`` and ``ddps data prepare`` (the import) stop with one
message naming the file and the fault, and leave the earlier import untouched."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.bad_inputs.conftest import (
    assert_clear_error,
    image_array,
    label_map,
    run_script,
    snapshot,
)


def _corrupt_png(root: Path) -> tuple[Path, str]:
    """A PNG whose signature and header are right but whose pixel data is garbage."""
    path = root / "real" / "train" / "train_1.png"
    data = bytearray(path.read_bytes())
    data[41:] = bytes(range(256)) * (len(data[41:]) // 256) + bytes(len(data[41:]) % 256)
    path.write_bytes(bytes(data))
    return path, "cannot read image (corrupt or not an image)"


def _corrupt_jpeg(root: Path) -> tuple[Path, str]:
    """A JPEG cut off after its first third (a partial download)."""
    png = root / "real" / "train" / "train_1.png"
    png.unlink()
    buf = io.BytesIO()
    Image.fromarray(np.kron(image_array(8, 1), np.ones((8, 8, 1), np.uint8))).save(buf, "JPEG", quality=95)
    path = png.with_suffix(".jpg")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    # the label must match the 64 px JPEG, so that only the truncation is wrong
    np.save(png.with_suffix(".npy"), label_map(64, 1))
    return path, "cannot read image (corrupt or not an image)"


def _truncated_npy(root: Path) -> tuple[Path, str]:
    path = root / "real" / "train" / "train_2.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    return path, "cannot read .npy label (corrupt or truncated)"


def _value_ge_k(root: Path) -> tuple[Path, str]:
    path = root / "real" / "train" / "train_0.npy"
    label = label_map(8, 0)
    label[2, 3] = 3  # K = 3: valid ids are 0, 1, 2 (and 255, the ignore index)
    np.save(path, label)
    return path, "label value(s) 3 >= num_classes=3"


def _empty_split(root: Path) -> tuple[Path, str]:
    folder = root / "real" / "test"
    for p in folder.iterdir():
        p.unlink()
    return folder, "split is empty"


def _duplicate_stem(root: Path) -> tuple[Path, str]:
    folder = root / "real" / "train"
    Image.fromarray(image_array(8, 0)).save(folder / "train_0.jpg")
    return folder / "train_0.jpg", "duplicate sample id 'train_0'"


FAULTS = {
    "corrupt_png": _corrupt_png,
    "corrupt_jpeg": _corrupt_jpeg,
    "truncated_npy": _truncated_npy,
    "label_value_ge_k": _value_ge_k,
    "empty_split": _empty_split,
    "duplicate_stem": _duplicate_stem,
}


@pytest.mark.parametrize("command", ["check", "prepare"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_dataset_one_message_earlier_import_untouched(imported, cli, fault, command):
    root, out, params = imported
    before = snapshot(out)
    offending, what = FAULTS[fault](root)
    if command == "check":
        res = cli("data", "check", root, "--format", "ddpm-seg")
    else:
        res = cli("data", "prepare", "--params", params)
    assert_clear_error(res, offending, what)
    assert snapshot(out) == before


def test_corrupt_image_console_script_exit_code_and_debug(imported):
    """The installed script in a real process: exit 1, one line, no traceback; ``--debug``
    shows the traceback of the same fault."""
    root, _, _ = imported
    offending, what = _corrupt_png(root)
    res = run_script("data", "check", root)
    assert res.code == 1
    assert_clear_error(res, offending, what)
    debug = run_script("--debug", "data", "check", root)
    assert debug.code != 0
    assert "Traceback (most recent call last)" in debug.err
    assert "DataError" in debug.err and str(offending) in debug.err


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_a_label_of_another_size_is_a_warning_naming_the_file_not_an_error(imported, cli, command):
    """Not a fault any more: the label is resized to its image (nearest, as the DDPM-Seg
    reference does) and one ``warning:`` line names it (docs/datasets.md)."""
    root, out, params = imported
    path = root / "real" / "test" / "test_0.npy"
    np.save(path, label_map(4, 0))
    res = cli("data", "check", root, "--format", "ddpm-seg") if command == "check" else \
        cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    lines = [line for line in (res.err + res.out).splitlines() if "test_0.npy" in line]
    assert len(lines) == 1 and "warning" in lines[0] and "differs from image" in lines[0], res.err + res.out
    if command == "prepare":
        assert np.load(out / "real" / "test" / "test_0.npy").shape == (8, 8)
