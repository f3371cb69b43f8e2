"""The flows: one per stage, each running the stage's one implementation (the same function
the CLI and DVC run); overrides validated before any task; transient faults retried, bad
input not; a fan-out stage's parts spread over writers give the in-process bytes; the
pipeline runs every stage in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from prefect import flow, task

from ddps_core import stages
from ddps_core.datasets import DDPMSegFolder
from ddps_core.errors import ConfigError, DataError
from ddps_core.features.store import FeatureStore
from tasks.common import retry_unless_user_error
from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def recorded(monkeypatch):
    """Stage ``data`` replaced by a recorder (the module attribute the registry reads)."""
    import ddps_core.datasets.stage as module

    calls = []

    def main(settings, report):
        calls.append(settings.data.synthetic.n_test)
        report.progress("data", 1, 1)
        return {"counts": {}, "n_test": settings.data.synthetic.n_test}

    monkeypatch.setattr(module, "DATA", stages.Stage("data", main=main, device="cpu"))
    return calls


def test_cli_flow_and_dvc_run_the_same_stage_function(recorded, tmp_path, monkeypatch):
    """The single path: the stage function, patched, is what `ddps data prepare` and the
    `data` flow call; and every DVC stage's command runs that stage's flow."""
    from ddps.cli import main
    from flows.stages import FLOWS, data

    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synthetic:\n    n_test: 3\n")
    with pytest.raises(SystemExit) as done:
        main(["data", "prepare", "--params", str(params), "--set", "data.synthetic.n_test=4"])
    assert done.value.code == 0
    assert data(params_path=str(params), overrides={"data.synthetic.n_test": 5}) == {"counts": {}, "n_test": 5}
    assert recorded == [4, 5]
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(stages.ORDER) == list(FLOWS)
    assert {name: s["cmd"] for name, s in dvc.items()} == {name: f"python -m flows {name}" for name in stages.ORDER}
    assert all(FLOWS[name].name == name for name in stages.ORDER)


def test_overrides_take_dotted_keys_or_sections_over_the_file(tmp_path):
    from flows.stages import data

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {tmp_path / 'ds'}\n  synthetic:\n    n_test: 3\n")
    summary = data(overrides={"data": {"synthetic": {"n_unlabeled": 4}}, "data.synthetic.n_labeled": 2},
                   params_path=str(params))
    assert summary["counts"] == {"train": 2, "test": 3, "unlabeled": 4}  # n_test from the file
    assert len(DDPMSegFolder(tmp_path / "ds", "test")) == 3


def test_a_bad_override_fails_the_run_naming_the_key_before_any_task(tmp_path):
    from flows.stages import data, extract

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {tmp_path / 'ds'}\n")
    with pytest.raises(ConfigError, match=r"data\.synthetic\.image_size: Input should be 32, 64 or 128 \(got 48\)"):
        data(overrides={"data.synthetic.image_size": 48}, params_path=str(params))
    state = data(overrides={"data": {"synthetic": {"n_tset": 3}}}, params_path=str(params), return_state=True)
    assert state.is_failed() and "data.synthetic.n_tset: unknown key" in state.message
    with pytest.raises(ConfigError, match=r"features\.shard_images: Input should be greater than or equal to 1"):
        extract(overrides={"features.shard_images": 0}, params_path=str(params))
    assert not (tmp_path / "ds").exists()


def test_transient_failure_is_retried_bad_input_is_not():
    attempts = {"flaky": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def flaky():
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise RuntimeError("worker lost")
        return "ok"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def bad():
        attempts["bad"] += 1
        raise DataError("x.png: corrupt")

    @flow
    def both():
        return flaky(), bad(return_state=True)

    result, bad_state = both()
    assert result == "ok" and attempts["flaky"] == 2
    assert bad_state.is_failed() and attempts["bad"] == 1


def test_tasks_are_tagged_with_the_stage_and_its_device_and_retry_transient_faults():
    from tasks.stage import finish_stage, plan_step, run_part, run_stage, tagged

    for name in stages.ORDER:
        for t in (run_stage, plan_step, run_part, finish_stage):
            tags = tagged(t, name).tags
            assert name in tags and stages.get(name).device in tags
            assert t.retries >= 1 and t.retry_condition_fn is retry_unless_user_error
    assert {n for n in stages.ORDER if stages.get(n).device == "cpu"} == {"data", "evaluate", "report"}


def test_two_writer_extract_flow_equals_the_in_process_stage(tmp_path, one_thread):
    from flows.stages import extract

    raw = tiny_project(tmp_path, {"n_unlabeled": 2, "n_labeled": 5, "n_test": 3},
                       features={"steps": [10], "blocks": [1, 2], "shard_images": 2, "batch_size": 2,
                                 "out": str(tmp_path / "lib"), "splits": ["train", "test", "unlabeled"]},
                       teacher={"baselines": []})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    from ddps_core.config import parse_settings

    stages.get("extract").run(parse_settings(raw))
    summary = extract(overrides={"features.out": str(tmp_path / "flow"), "features.workers": 2}, params_path=str(params))
    assert summary["train"]["n_done"] == 5
    for split in ("train", "test", "unlabeled"):
        a = FeatureStore.open(tmp_path / "lib" / f"{split}.zarr", read_only=True)
        b = FeatureStore.open(tmp_path / "flow" / f"{split}.zarr", read_only=True)
        assert b.is_complete()
        for i in range(len(a)):
            assert all(np.array_equal(a.native(i)[n], b.native(i)[n]) for n in a.names)


def test_pipeline_runs_every_stage_in_order_with_the_overrides(monkeypatch, tmp_path):
    from flows import pipeline
    from flows import stages as stage_flows
    from flows.common import settings_for

    calls = []
    for name in stages.ORDER:
        def stub(_name=name, **kwargs):
            s = settings_for(kwargs["params_path"], kwargs["overrides"])
            calls.append((_name, s.features.out, s.refiner.steps))
            return f"{_name} done"

        monkeypatch.setitem(stage_flows.FLOWS, name, stub)
    params = tmp_path / "params.yaml"
    params.write_text("refiner:\n  steps: 7\nfeatures:\n  out: from_file\n")
    result = pipeline.pipeline(overrides={"features.out": "feats"}, params_path=str(params))
    assert [c[0] for c in calls] == list(stages.ORDER)
    assert result == {name: f"{name} done" for name in stages.ORDER}
    assert all(c[1:] == ("feats", 7) for c in calls)
    calls.clear()
    with pytest.raises(ConfigError, match=r"refiner\.stepz: unknown key"):
        pipeline.pipeline(overrides={"refiner": {"stepz": 3}}, params_path=str(params))
    assert calls == []


def test_a_stage_run_publishes_its_summary_table_and_its_outputs(tmp_path):
    """The Artifacts tab of a run: the stage's summary as a table, its outputs and pictures
    as a markdown page, under keys per stage."""
    import json

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.stages import data

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {tmp_path / 'ds'}\n  synthetic:\n    n_unlabeled: 2\n    n_labeled: 2\n    n_test: 2\n")
    data(params_path=str(params))

    def latest(key):
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        assert found, key
        return max(found, key=lambda a: a.created)

    table = latest("data-summary")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    counts = next(r for r in rows if r["name"] == "counts")
    assert {k: counts[k] for k in ("train", "test", "unlabeled")} == {"train": 2, "test": 2, "unlabeled": 2}
    page = latest("data-outputs")
    assert page.type == "markdown" and f"`{tmp_path / 'ds'}`" in page.data


def test_summary_rows_flatten_what_the_stages_return():
    from flows.artifacts import summary_rows

    rows = summary_rows({"steps": 5, "final_loss": float("nan"), "models": {"refiner": {"steps": 5, "out": "x"}},
                         "teacher": {"miou": 55.123456, "mbiou": 44.0}, "table": [{"method": "a", "mIoU": 1.0}]})
    assert rows == [{"name": "summary", "steps": 5, "final_loss": None},
                    {"name": "models/refiner", "steps": 5, "out": "x"},
                    {"name": "teacher", "miou": 55.1235, "mbiou": 44.0},
                    {"method": "a", "mIoU": 1.0}]
