"""Faults under Prefect, on a tiny project: a transient OSError in a real stage task is
retried and the flow completes; a flow that fails leaves the outputs of the earlier stages
byte for byte as they were. (``tests/flows/test_stages.py`` checks the retry rule itself on toy
tasks: a transient error retried, a bad input not.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from ddps_core.errors import DataError
from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("prefect_harness", "one_thread")


def _snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """``path -> (sha256, mtime_ns)`` of every file under ``roots``."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path):
    torch.set_num_threads(1)
    raw = tiny_project(
        tmp_path, {"n_unlabeled": 2, "n_labeled": 4, "n_test": 2},
        features={"steps": [10], "blocks": [1, 2], "shard_images": 2, "batch_size": 2,
                  "out": str(tmp_path / "features")},
        teacher={"baselines": [], "members": 2, "max_epochs": 2, "out": str(tmp_path / "ens"),
                 "labels_out": str(tmp_path / "labels"), "min_class_pixels": 1})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return tmp_path, params


def test_transient_oserror_in_the_data_task_is_retried_and_the_flow_completes(project, monkeypatch):
    import ddps_core.datasets.stage as data_stage
    from flows.stages import data

    root, params = project
    real, calls = data_stage.prepare_dataset, []

    def flaky(settings, progress=None, warn=None):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("injected: NFS server not responding")
        return real(settings, progress, warn)

    monkeypatch.setattr(data_stage, "prepare_dataset", flaky)
    state = data(params_path=str(params), return_state=True)
    assert state.is_completed(), state.message
    assert len(calls) == 2  # the first try failed, the retry completed
    summary = state.result()
    assert summary["counts"] == {"train": 4, "test": 2, "unlabeled": 2}


def test_a_failed_flow_leaves_the_earlier_stage_outputs_intact(project, monkeypatch):
    import ddps_core.teacher.stage as teacher_stage
    from flows.stages import data, extract, train_teacher

    root, params = project
    data(params_path=str(params))
    extract(params_path=str(params))
    before = _snapshot(root / "dataset", root / "features")
    assert any(p.endswith("zarr.json") for p in before) and any(p.endswith(".png") for p in before)

    seen = []

    def failing(sampler, ensemble, **kw):
        # fails once training has read the features; a bad input is not retried
        next(iter(sampler))
        seen.append(1)
        raise DataError(f"{sampler.store.path}: injected fault while training")

    monkeypatch.setattr(teacher_stage, "train_ensemble", failing)
    state = train_teacher(params_path=str(params), return_state=True)
    assert state.is_failed() and "injected fault" in state.message
    assert len(seen) == 1  # a bad input is not retried
    assert _snapshot(root / "dataset", root / "features") == before
    assert not (root / "ens" / "ensemble.safetensors").exists()
