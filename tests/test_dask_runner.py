"""Fan-out on Dask: the extract flow on a 2-worker LocalCluster (processes) writes the same
stores as the thread pool, bit for bit; labelling parts are dealt to disjoint tasks and
give the single-task result; the runner is chosen from the settings."""

import pickle

import numpy as np
import pandas as pd
import pytest
import yaml

from ddps_core.config import parse_settings
from ddps_core.features.stage import run_stage
from ddps_core.features.store import FeatureStore

from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    raw = tiny_project(root, {"n_unlabeled": 9, "n_labeled": 5, "n_test": 3},
                       features={"steps": [10, 100], "blocks": [1, 2, 3], "shard_images": 2, "batch_size": 2,
                                 "random_unet": False, "out": str(root / "features")},
                       teacher={"methods": ["ddpm"], "members": 2, "max_epochs": 1, "out": str(root / "ens"),
                                 "labels_out": str(root / "labels")})
    return root, raw


def _arrays(path):
    store = FeatureStore.open(path, read_only=True)
    return store, {n: np.stack([store.native(i)[n] for i in range(len(store))]) for n in store.names}


def test_runner_is_chosen_from_the_settings():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.common import task_runner, tasks_per_split

    s = parse_settings({})
    assert isinstance(task_runner(s), ThreadPoolTaskRunner) and tasks_per_split(s) == 1
    local = parse_settings({"runner": "dask", "dask": {"n_workers": 3, "threads_per_worker": 2}})
    runner = task_runner(local)
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs["n_workers"] == 3 and runner.cluster_kwargs["threads_per_worker"] == 2
    assert runner.cluster_kwargs["processes"] is True and tasks_per_split(local) == 3
    remote = parse_settings({"runner": "dask", "dask": {"address": "tcp://127.0.0.1:8786", "tasks_per_split": 8}})
    assert task_runner(remote).address == "tcp://127.0.0.1:8786" and tasks_per_split(remote) == 8
    with pytest.raises(Exception, match="runner: Input should be 'thread' or 'dask'"):
        parse_settings({"runner": "ray"})


def test_tasks_and_their_arguments_pickle():
    """What a Dask worker receives: the task objects and the settings (pydantic models)."""
    import cloudpickle

    from tasks.ensemble import label_parts_task
    from tasks.features import extract_shards_task
    from tasks.generate_steps import sample_batches_task

    s = parse_settings({"runner": "dask", "storage": {"options": {"anon": False}}})
    assert pickle.loads(pickle.dumps(s)) == s
    for task in (extract_shards_task, label_parts_task, sample_batches_task):
        again = cloudpickle.loads(cloudpickle.dumps(task))
        assert again.name == task.name and again.fn.__module__ == task.fn.__module__


def test_labelling_parts_in_disjoint_tasks_equal_one_task(project, tmp_path, monkeypatch):
    import ddps_core.teacher.stage as stage

    root, raw = project
    s = parse_settings(raw)
    run_stage(s)
    stage.train_method(s, "ddpm")
    monkeypatch.setattr(stage, "PART_IMAGES", 2)  # 9 pool images: 5 parts
    one = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "one")}})
    many = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "many")}})
    stage.label_split(one, "ddpm", "unlabeled", one.teacher.labels_out)
    groups = stage.plan_label_split(many, "ddpm", "unlabeled", 3)
    assert groups == [[0, 3], [1, 4], [2]]  # disjoint, every part once
    for parts in reversed(groups):  # any order of the tasks
        stage.label_split_parts(many, "ddpm", "unlabeled", parts)
    assert stage.plan_label_split(many, "ddpm", "unlabeled", 3) == []  # nothing left to do
    assert stage.finish_label_split(many, "ddpm", "unlabeled") == 9
    a, b = tmp_path / "one" / "ddpm" / "unlabeled", tmp_path / "many" / "ddpm" / "unlabeled"
    pd.testing.assert_frame_equal(pd.read_parquet(a / "scores.parquet"), pd.read_parquet(b / "scores.parquet"))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and not (b / ".parts").exists()
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.slow  # starting the cluster's two worker processes takes most of a minute on 2 cores
def test_extract_flow_on_a_local_dask_cluster_equals_the_thread_pool(project, tmp_path, prefect_harness):
    from flows.extract_features import extract_features_flow

    root, raw = project
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    threads = extract_features_flow(features={"out": str(tmp_path / "threads"), "workers": 2},
                                    params_path=str(params))
    dask_raw = {**raw, "runner": "dask", "dask": {"n_workers": 2, "threads_per_worker": 1}}
    params.write_text(yaml.safe_dump(dask_raw))
    dask = extract_features_flow(features={"out": str(tmp_path / "dask"), "workers": 2},
                                 params_path=str(params))
    assert dask["unlabeled"]["images_written"] == threads["unlabeled"]["images_written"] == 9
    for split in ("train", "test", "unlabeled"):
        a, arrays_a = _arrays(tmp_path / "threads" / f"{split}.zarr")
        b, arrays_b = _arrays(tmp_path / "dask" / f"{split}.zarr")
        assert b.is_complete() and a.names == b.names
        for n in a.names:
            assert arrays_a[n].tobytes() == arrays_b[n].tobytes(), (split, n)  # bit for bit
        if a.has_labels:
            assert all(np.array_equal(a.label(i), b.label(i)) for i in range(len(a)))


@pytest.mark.slow
def test_label_and_generate_flows_on_a_local_dask_cluster_equal_the_library(project, tmp_path, prefect_harness):
    """The label flow and the generate flow (sampling batches and sample shards fanned out
    over two worker processes) write what the in-process library path writes."""
    import ddps_core.teacher.stage as stage
    from ddps_core.generate.stage import run_stage as generate
    from flows.generate import generate_flow
    from flows.label import label_flow

    root, raw = project
    raw = {**raw, "features": {**raw["features"], "out": str(tmp_path / "features")},
           "generate": {"source": "both", "n_samples": 5, "sample_steps": 2, "batch_size": 2,
                        "drop_certain": 1, "drop_uncertain": 0.2, "contact_sheet": 1}}
    lib = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "lib" / "labels")},
                          "generate": {**raw["generate"], "out": str(tmp_path / "lib" / "out"),
                                       "work": str(tmp_path / "lib" / "work")}})
    run_stage(lib)
    stage.train_method(lib, "ddpm")
    for split in ("test", "unlabeled"):
        stage.label_split(lib, "ddpm", split, lib.teacher.labels_out)
    lib_stats = generate(lib)
    dask_raw = {**raw, "runner": "dask", "dask": {"n_workers": 2, "tasks_per_split": 2},
                "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "dask" / "labels")},
                "generate": {**raw["generate"], "out": str(tmp_path / "dask" / "out"),
                             "work": str(tmp_path / "dask" / "work")}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dask_raw))
    assert label_flow(params_path=str(params)) == ["ddpm/test", "ddpm/unlabeled"]
    for split in ("test", "unlabeled"):
        a, b = tmp_path / "lib" / "labels" / "ddpm" / split, tmp_path / "dask" / "labels" / "ddpm" / split
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    stats = generate_flow(params_path=str(params))
    assert stats == lib_stats and stats["generated"]["candidates"] == 5
    a, b = tmp_path / "lib" / "out", tmp_path / "dask" / "out"
    pd.testing.assert_frame_equal(pd.read_parquet(a / "manifest.parquet"), pd.read_parquet(b / "manifest.parquet"))
    for sub in ("images", "masks"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert names and names == sorted(p.name for p in (b / sub).iterdir())
        assert all((a / sub / n).read_bytes() == (b / sub / n).read_bytes() for n in names)
