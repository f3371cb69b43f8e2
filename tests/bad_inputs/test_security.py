"""Security defaults: every weight load refuses pickled code, and no path listed in a
manifest or a setting reaches outside its dataset root."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ddps_core.datasets import open_dataset
from ddps_core.errors import DataError
from tests.bad_inputs.conftest import CLASSES, assert_clear_error, image_array, label_map

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("ddps", "ddps_core", "flows", "tasks", "benchmarks", "tests")


# --------------------------------------------------------------------------- weight loads
def unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` of every call in ``tree`` that could unpickle code: ``torch.load``
    without ``weights_only=True``, ``np.load(allow_pickle=True)``, ``pickle.load(s)``,
    ``yaml.load`` / ``yaml.unsafe_load``, ``torch.serialization.load``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}

        def is_true(key: str) -> bool:
            return isinstance(kw.get(key), ast.Constant) and kw[key].value is True

        if name in ("torch.load", "torch.serialization.load") and not is_true("weights_only"):
            found.append((node.lineno, f"{name} without weights_only=True"))
        elif name in ("np.load", "numpy.load") and "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            found.append((node.lineno, f"{name} with allow_pickle"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append((node.lineno, name))
        elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads"):
            found.append((node.lineno, name))
    return found


def test_the_scanner_finds_unsafe_loads():
    bad = ast.parse("import torch, pickle, yaml, numpy as np\n"
                    "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=flag)\n"
                    "np.load(p, allow_pickle=True)\npickle.loads(b)\nyaml.load(s)\n"
                    "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\n"
                    "yaml.safe_load(s)\n")
    assert [line for line, _ in unsafe_loads(bad)] == [2, 3, 4, 5, 6, 7]


def test_every_weight_load_in_the_source_tree_is_weights_only():
    """An AST scan of every Python file of the project: ``torch.load`` is ``weights_only``
    everywhere, tests included (the one exception: the test that shows a malicious file is
    armed before it shows that loading refuses it). The library, flows, tasks and benchmarks
    also never unpickle or ``yaml.load``; tests may round-trip their own objects."""
    allowed = {("tests/bad_inputs/test_checkpoints.py", "torch.load without weights_only=True")}
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 50
    torch_loads = 0
    problems = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        torch_loads += sum(isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.load"
                           for n in ast.walk(tree))
        problems += [f"{rel}:{line}: {what}" for line, what in unsafe_loads(tree)
                     if (rel, what) not in allowed
                     and (what.startswith("torch.") or not rel.startswith("tests/"))]
    assert torch_loads >= 5  # the scan does see the project's weight loads
    assert not problems, "unsafe loads:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- paths
def _generic_folder(root: Path, n: int = 2) -> Path:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(image_array(8, i)).save(root / "images" / f"s{i}.png")
        Image.fromarray(label_map(8, i)).save(root / "masks" / f"s{i}.png")
    (root / "classes.yaml").write_text("\n".join(f"- {c}" for c in CLASSES) + "\n")
    return root


@pytest.fixture
def outside(tmp_path):
    """A valid dataset next to (outside) the dataset root, so that escaping would work."""
    root = tmp_path / "ds"
    _generic_folder(root / "train")
    _generic_folder(tmp_path / "secret")
    return root


@pytest.mark.parametrize("split", ["../secret", "train/../../secret", "SECRET_ABS"])
def test_folder_reader_split_cannot_leave_the_root(outside, split):
    split = str(outside.parent / "secret") if split == "SECRET_ABS" else split
    assert len(open_dataset("folder", outside, "train")) == 2  # control: the root itself reads
    with pytest.raises(DataError, match=r"(leaves the dataset root|is absolute)") as info:
        open_dataset("folder", outside, split)
    assert split in str(info.value)


@pytest.mark.parametrize("kind", ["ddpm-seg", "ade20k", "cityscapes"])
def test_fixed_layout_readers_refuse_a_split_path(outside, kind):
    with pytest.raises(DataError, match="split"):
        open_dataset(kind, outside, "../secret")


def test_split_setting_cannot_leave_the_root_cli(outside, tmp_path, cli):
    """``data.splits`` of params.yaml and ``ddps data check --split`` reach the same check."""
    res = cli("data", "check", outside, "--format", "folder", "--split", "../secret")
    assert_clear_error(res, "'../secret' leaves the dataset root")
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: folder\n  root: {outside}\n  out: {tmp_path / 'out'}\n"
                      "  splits: {train: train, test: ../secret}\n")
    res = cli("data", "prepare", "--params", params)
    assert_clear_error(res, "'../secret' leaves the dataset root")
    assert not (tmp_path / "out").exists()


def _export(root: Path) -> pd.DataFrame:
    """A minimal export: images/ + masks/ and the manifest rows the contact sheet reads."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rows = []
    for i in range(2):
        Image.fromarray(image_array(8, i)).save(root / "images" / f"g{i}.png")
        Image.fromarray(label_map(8, i)).save(root / "masks" / f"g{i}.png")
        rows.append({"image_id": f"g{i}", "source": "generated", "score": 0.1 * i, "rank": i,
                     "kept": True, "image": f"images/g{i}.png", "mask": f"masks/g{i}.png"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("column", ["image", "mask"])
@pytest.mark.parametrize("entry", ["../secret.png", "images/../../secret.png", "ABS"])
def test_manifest_paths_cannot_leave_the_export(tmp_path, column, entry):
    from ddps_core.generate.export import contact_sheet

    secret = tmp_path / "secret.png"
    Image.fromarray(label_map(8, 5) if column == "mask" else image_array(8, 5)).save(secret)
    root = tmp_path / "export"
    manifest = _export(root)
    assert contact_sheet(root, manifest, n=2) is not None  # control: the manifest is valid
    manifest.loc[1, column] = str(secret) if entry == "ABS" else entry
    with pytest.raises(DataError, match=r"manifest.parquet: image 'g1'.*(leaves the dataset root|is absolute)"):
        contact_sheet(root, manifest, n=2)


# --------------------------------------------------------------------------- servers
def test_nothing_binds_all_interfaces_by_default():
    """Servers bind 127.0.0.1 unless the user says otherwise: no wildcard address appears in
    the code or the configuration the project ships (the temporary Prefect server of a flow
    binds 127.0.0.1 itself, and so does ``prefect server start`` unless given ``--host``)."""
    texts = [p for d in ("ddps", "ddps_core", "flows", "tasks") for p in sorted((REPO / d).rglob("*.py"))]
    texts += [REPO / n for n in ("Makefile", "params.yaml", "dvc.yaml", "prefect.yaml", "pyproject.toml")
              if (REPO / n).is_file()]
    assert len(texts) > 30
    wildcard = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
                for p in texts for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                if "0.0.0.0" in line or "host=''" in line or 'host=""' in line or "[::]" in line]
    assert not wildcard, "\n".join(wildcard)
    from prefect.settings import PREFECT_SERVER_API_HOST

    assert PREFECT_SERVER_API_HOST.value() == "127.0.0.1"
