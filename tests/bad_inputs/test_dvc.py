"""Bad input under a real ``dvc repro`` (marked slow), in a fresh git + DVC copy of the
repository that imports a small user dataset and trains a tiny DDPM on it:

* a typo in params.yaml, or a corrupt file under ``data.root``, stops the run with one
  ``error:`` line that names the key or the file, the last thing the stage prints, no
  Python traceback, a non-zero exit, and the dataset and the model as they were (DVC
  deletes an output that is not ``persist`` before it runs the stage);
* new content under the same file names in ``data.root`` (a setting, not a DVC dep) is
  noticed: the data stage runs on every repro and rebuilds; unchanged, it writes nothing
  and the later stages stay up to date.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.bad_inputs.conftest import make_user_dataset, snapshot

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _repro(work: Path, env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """``dvc repro ARGS``: its exit status and its output lines (stdout and stderr in order)."""
    proc = subprocess.run(["dvc", "repro", *args], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    return proc.returncode, proc.stdout.splitlines()


def _one_error_last(lines: list[str]) -> list[str]:
    """The stage's ``error:`` message (its line and the indented lines under it): exactly one,
    with nothing after it but DVC's own report of the failed stage; no traceback anywhere."""
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    at = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(at) == 1, text
    end = at[0] + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    rest = [line for line in lines[end:] if line.strip()]
    assert rest and all(line.startswith("ERROR") for line in rest), text
    return lines[at[0]:end]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc")
    work = base / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    user = make_user_dataset(base / "user", n_train=3, n_test=2, size=8)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["device"] = "cpu"
    params["data"].update(source="ddpm-seg", root=str(user))
    params["ddpm"].update(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=1, sample_count=0,
                          log_every=1, threads=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PREFECT_HOME": str(base / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(base / "cache"), "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.invalid",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.invalid"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PYTHONPATH", None)  # the copy's own code, from its working folder
    subprocess.run(["git", "init", "-q"], cwd=work, env=env, check=True)
    code, lines = _repro(work, env, "train_ddpm")
    assert code == 0, "\n".join(lines[-60:])
    assert (work / "data/dataset/real/train/train_0.npy").is_file()
    assert (work / "data/models/ddpm/ema.safetensors").is_file()
    return work, env, user


def _outputs(work: Path) -> dict:
    """Every file of the dataset and of the model, by content. Not by modification time: before
    DVC runs a stage it unprotects the stage's persistent outputs, and with the cache's hard
    links (``.dvc/config``) that copies every file, same bytes, new times."""
    return {f"{name}/{path}": digest for name, folder in (("dataset", "data/dataset"), ("ddpm", "data/models/ddpm"))
            for path, (_, _, digest) in snapshot(work / folder).items()}


def test_a_typo_in_params_is_one_line_and_keeps_the_dataset_and_the_model(project):
    work, env, _ = project
    before = _outputs(work)
    good = (work / "params.yaml").read_text()
    typo = good.replace("  ignore_index: 255", "  ignore_indx: 255", 1)
    assert typo != good
    (work / "params.yaml").write_text(typo)
    try:
        code, lines = _repro(work, env, "train_ddpm")
    finally:
        (work / "params.yaml").write_text(good)
    assert code != 0
    message = _one_error_last(lines)
    assert "params.yaml: data.ignore_indx: unknown key" in "\n".join(message)
    assert _outputs(work) == before


def test_a_corrupt_file_under_the_data_root_is_one_line_and_keeps_the_outputs(project):
    work, env, user = project
    before = _outputs(work)
    label = user / "real" / "train" / "train_1.npy"
    good = label.read_bytes()
    label.write_bytes(good[:-20])
    try:
        code, lines = _repro(work, env, "train_ddpm")
    finally:
        label.write_bytes(good)
    assert code != 0
    (line,) = _one_error_last(lines)
    assert f"error: {label}: cannot read .npy label (corrupt or truncated)" in line
    assert _outputs(work) == before


def test_new_content_under_the_same_names_is_imported_by_dvc_repro(project):
    work, env, user = project
    label = user / "real" / "train" / "train_0.npy"
    st = label.stat()
    new = np.full((8, 8), 2, np.uint8)
    np.save(label, new)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a copy that keeps times leaves it
    code, lines = _repro(work, env, "data")
    assert code == 0, "\n".join(lines[-40:])
    np.testing.assert_array_equal(np.load(work / "data/dataset/real/train/train_0.npy"), new)
    status = subprocess.run(["dvc", "status", "train_ddpm"], cwd=work, env=env, capture_output=True, text=True)
    assert "data/dataset" in status.stdout  # the model's input changed: it is out of date


def test_unchanged_sources_write_nothing_and_the_next_stages_stay_up_to_date(project):
    work, env, _ = project
    code, lines = _repro(work, env, "train_ddpm")  # brings the model up to date with the new data
    assert code == 0, "\n".join(lines[-40:])
    before = _outputs(work)
    code, lines = _repro(work, env, "train_ddpm")
    assert code == 0, "\n".join(lines[-40:])
    text = "\n".join(lines)
    assert "Running stage 'data'" in text and "Stage 'train_ddpm' didn't change, skipping" in text, text
    assert _outputs(work) == before
