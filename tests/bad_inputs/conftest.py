"""Shared pieces of the bad-input corpus.

Each case builds its bad input in ``tmp_path``, runs the real ``ddps`` command line (the
console-script function :func:`ddps.cli.main` in-process, or ``python -m ddps`` of this
checkout in a subprocess) and checks the contract of the README: a non-zero exit, one message
that names the offending file or key and the fault, no traceback (unless ``--debug``), and no
earlier output changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ddps.cli import main

#: The checkout these tests belong to: a subprocess runs its code (``python -m ddps``), not
#: whatever checkout a shared environment's console script was installed from.
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def message(self) -> str:
        """The error message: stderr from its ``error:`` line on (earlier log lines dropped)."""
        i = self.err.find("error:")
        return self.err[i:] if i >= 0 else ""


@pytest.fixture
def cli(capsys):
    """Run ``ddps ARGS...`` in-process through the console-script entry point."""

    def run(*args: object) -> Result:
        capsys.readouterr()  # drop what earlier set-up steps printed
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
        cap = capsys.readouterr()
        code = info.value.code
        return Result(code if isinstance(code, int) else (0 if code is None else 1), cap.out, cap.err)

    return run


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that runs this checkout's code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def run_script(*args: object, cwd: Path | None = None, module: str = "ddps", timeout: int = 300) -> Result:
    """Run ``python -m ddps ARGS...`` (the console script's entry point; or another
    ``module``, e.g. ``flows``) of this checkout in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=subprocess_env(), timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clear_error(res: Result, *needles: object) -> str:
    """Non-zero exit, exactly one ``error:`` message containing every needle, no traceback."""
    assert res.code != 0, f"exit code 0 on bad input; stdout:\n{res.out}\nstderr:\n{res.err}"
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err
    lines = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one error message, got:\n{res.err}"
    for needle in needles:
        assert str(needle) in res.message, f"{needle!r} not in the message:\n{res.message}"
    return res.message


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``root`` (hidden ones too): size, mtime (ns), sha256. A
    feature store's writer lock is not output: a refused run takes and gives it back, so only
    its content (empty: free) is compared."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = (0, 0, "dir")
        for name in filenames:
            p = Path(dirpath) / name
            st = p.stat()
            if name == "writer.lock":
                out[str(p.relative_to(root))] = (st.st_size, 0, hashlib.sha256(p.read_bytes()).hexdigest())
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    assert out, f"{root}: empty snapshot (nothing to protect)"
    return out


# --------------------------------------------------------------------------- datasets
CLASSES = ["background", "thing", "stuff"]  # K = 3


def label_map(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, len(CLASSES), (size, size), dtype=np.uint8)


def image_array(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_user_dataset(root: Path, n_train: int = 3, n_test: int = 2, size: int = 8) -> Path:
    """A valid user dataset in the DDPM-Seg layout (PNG images, .npy labels, K = 3)."""
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / "real" / split
        folder.mkdir(parents=True)
        for i in range(n):
            seed = i + (100 if split == "test" else 0)
            Image.fromarray(image_array(size, seed)).save(folder / f"{split}_{i}.png")
            np.save(folder / f"{split}_{i}.npy", label_map(size, seed))
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": CLASSES}))
    return root


def import_params(tmp: Path, root: Path, out: Path) -> Path:
    """A params.yaml that imports ``root`` (ddpm-seg) into ``out`` (stage data)."""
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "ddpm-seg", "root": str(root), "out": str(out)}}))
    return path


@pytest.fixture
def imported(tmp_path, cli):
    """A user dataset and its earlier, successful import: ``(root, out, params)``."""
    root = make_user_dataset(tmp_path / "user")
    out = tmp_path / "dataset"
    params = import_params(tmp_path, root, out)
    res = cli("data", "prepare", "--params", params)
    assert res.code == 0, res.err
    assert (out / "real" / "train" / "train_0.npy").is_file()
    return root, out, params
