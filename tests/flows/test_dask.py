"""Fan-out on Dask: the extract flow on a 2-worker LocalCluster (processes) writes the same
stores as the thread pool, bit for bit, and the label and generate flows write what the
in-process stages write; the runner is chosen from the settings."""

import pickle

import numpy as np
import pandas as pd
import pytest
import yaml

from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.features.store import FeatureStore

from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    raw = tiny_project(root, {"n_unlabeled": 9, "n_labeled": 5, "n_test": 3},
                       features={"steps": [10, 100], "blocks": [1, 2, 3], "shard_images": 2, "batch_size": 2,
                                 "out": str(root / "features"), "splits": ["train", "test", "unlabeled"]},
                       teacher={"baselines": [], "members": 2, "max_epochs": 1, "out": str(root / "ens"),
                                "labels_out": str(root / "labels")})
    return root, raw


def _arrays(path):
    store = FeatureStore.open(path, read_only=True)
    return store, {n: np.stack([store.native(i)[n] for i in range(len(store))]) for n in store.names}


def test_runner_is_chosen_from_the_settings():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.common import parallel_tasks, task_runner

    s = parse_settings({})
    assert isinstance(task_runner(s), ThreadPoolTaskRunner) and parallel_tasks(s) == 1
    local = parse_settings({"runner": "dask", "dask": {"n_workers": 3, "threads_per_worker": 2}})
    runner = task_runner(local)
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs["n_workers"] == 3 and runner.cluster_kwargs["threads_per_worker"] == 2
    assert runner.cluster_kwargs["processes"] is True and parallel_tasks(local) == 3
    remote = parse_settings({"runner": "dask", "dask": {"address": "tcp://127.0.0.1:8786", "tasks_per_split": 8}})
    assert task_runner(remote).address == "tcp://127.0.0.1:8786" and parallel_tasks(remote) == 8
    with pytest.raises(Exception, match="runner: Input should be 'thread' or 'dask'"):
        parse_settings({"runner": "ray"})


def test_tasks_and_their_arguments_pickle():
    """What a Dask worker receives: the task objects and the settings (pydantic models)."""
    import cloudpickle

    from tasks.stage import finish_stage, plan_step, run_part, run_stage

    s = parse_settings({"runner": "dask", "storage": {"options": {"anon": False}}})
    assert pickle.loads(pickle.dumps(s)) == s
    for task in (run_stage, plan_step, run_part, finish_stage):
        again = cloudpickle.loads(cloudpickle.dumps(task))
        assert again.name == task.name and again.fn.__module__ == task.fn.__module__


@pytest.mark.slow  # starting the cluster's two worker processes takes most of a minute on 2 cores
def test_extract_flow_on_a_local_dask_cluster_equals_the_thread_pool(project, tmp_path, prefect_harness):
    from flows.stages import extract

    root, raw = project
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    threads = extract(overrides={"features.out": str(tmp_path / "threads"), "features.workers": 2},
                      params_path=str(params))
    dask_raw = {**raw, "runner": "dask", "dask": {"n_workers": 2, "threads_per_worker": 1}}
    params.write_text(yaml.safe_dump(dask_raw))
    dask = extract(overrides={"features.out": str(tmp_path / "dask"), "features.workers": 2},
                   params_path=str(params))
    assert dask["unlabeled"]["n_done"] == threads["unlabeled"]["n_done"] == 9
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
    from flows.stages import generate, label

    root, raw = project
    raw = {**raw, "features": {**raw["features"], "out": str(tmp_path / "features")},
           "generate": {"source": "both", "n_samples": 5, "sample_steps": 2, "batch_size": 2, "filter": "drop_both",
                        "drop_certain": 1, "drop_uncertain": 0.2, "contact_sheet": 1}}
    lib = parse_settings({**raw, "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "lib" / "labels")},
                          "generate": {**raw["generate"], "out": str(tmp_path / "lib" / "out"),
                                       "work": str(tmp_path / "lib" / "work")}})
    for name in ("extract", "train_teacher", "label"):
        stages.get(name).run(lib)
    lib_stats = stages.get("generate").run(lib)
    dask_raw = {**raw, "runner": "dask", "dask": {"n_workers": 2, "tasks_per_split": 2},
                "teacher": {**raw["teacher"], "labels_out": str(tmp_path / "dask" / "labels")},
                "generate": {**raw["generate"], "out": str(tmp_path / "dask" / "out"),
                             "work": str(tmp_path / "dask" / "work")}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dask_raw))
    assert set(label(params_path=str(params))) == {"teacher/test", "teacher/unlabeled"}
    for split in ("test", "unlabeled"):
        a, b = tmp_path / "lib" / "labels" / "teacher" / split, tmp_path / "dask" / "labels" / "teacher" / split
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    stats = generate(params_path=str(params))
    assert stats == lib_stats and stats["generated"]["candidates"] == 5
    a, b = tmp_path / "lib" / "out", tmp_path / "dask" / "out"
    pd.testing.assert_frame_equal(pd.read_parquet(a / "manifest.parquet"), pd.read_parquet(b / "manifest.parquet"))
    for sub in ("images", "masks"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert names and names == sorted(p.name for p in (b / sub).iterdir())
        assert all((a / sub / n).read_bytes() == (b / sub / n).read_bytes() for n in names)
