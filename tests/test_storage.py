"""Feature stores and reports on fsspec URLs: an in-memory filesystem (fast) and an S3 API on
loopback (moto's server), checked object by object against the local folder path."""

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ddps_core import storage
from ddps_core import stages
from ddps_core.config import parse_settings
from ddps_core.errors import ConfigError, DataError
from ddps_core.features.stage import open_store, plan_shards, store_path
from ddps_core.features.store import FeatureStore
from ddps_core.progress import Reporter

from tests.helpers import tiny_project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-url")
    raw = tiny_project(root, {"n_unlabeled": 2, "n_labeled": 4, "n_test": 3},
                       features={"steps": [10], "blocks": [1, 2], "shard_images": 2, "batch_size": 2,
                                 "splits": ["train", "test"]},
                       teacher={"baselines": []})
    return root, raw


def run_stage(s):
    return stages.get("extract").run(s)


def _settings(raw, out, **sections):
    merged = {**raw, "features": {**raw["features"], "out": str(out)}}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value}
    return parse_settings(merged)


def _local_files(folder: Path) -> dict[str, bytes]:
    """Every file but the writer lock (it names its holder: a token of its own per store)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != "writer.lock"}


def _remote_files(url: str, options=None) -> dict[str, bytes]:
    fs, root = storage.filesystem(url, options)
    return {key: fs.cat_file(path) for path in fs.find(root)
            if (key := path[len(root):].lstrip("/")) != "writer.lock"}


def test_store_on_a_url_holds_the_same_objects_as_the_folder(project, tmp_path):
    root, raw = project
    local = _settings(raw, tmp_path / "f")
    url = f"memory://ddps-{uuid.uuid4().hex[:8]}/features"
    remote = _settings(raw, url)
    run_stage(local)
    summary = run_stage(remote)
    assert summary["train"]["n_done"] == 4 and summary["train"]["path"] == f"{url}/train.zarr"
    for split in ("train", "test"):
        files = _local_files(Path(store_path(local, split)))
        objects = _remote_files(str(store_path(remote, split)))
        assert sorted(objects) == sorted(files)  # same keys, flat shard names included
        assert all(objects[k] == files[k] for k in files)  # byte for byte
    # reading through zarr's FsspecStore: every array, image and label
    a, b = open_store(local, "train"), open_store(remote, "train", read_only=True)
    assert b.remote and b.is_complete() and b.info()["bytes_on_disk"] == a.info()["bytes_on_disk"]
    for i in range(len(a)):
        na, nb = a.native(i), b.native(i)
        assert all(np.array_equal(na[n], nb[n]) for n in a.names)
        assert np.array_equal(a.label(i), b.label(i))
    ys, xs = np.array([0, 5, 31]), np.array([3, 0, 31])
    assert np.array_equal(a.pixels(1, ys, xs), b.pixels(1, ys, xs))
    # a finished store is not rewritten; other settings rebuild it on the URL too
    assert plan_shards(remote, 1, Reporter()) == []
    rebuilt = run_stage(_settings(raw, url, features={"steps": [20]}))
    assert rebuilt["train"]["n_done"] == 4
    assert open_store(remote, "train").settings()["steps"] == [20]


def test_a_failed_put_leaves_the_shard_not_done(project, monkeypatch):
    """The shard's record is written only after every shard object's PUT returned."""
    root, raw = project
    url = f"memory://ddps-{uuid.uuid4().hex[:8]}/features"
    s = _settings(raw, url)
    from ddps_core.features.stage import extract_shards

    plan_shards(s, 1, Reporter())
    fs = open_store(s, "train")._fs
    shapes = open_store(s, "train").shapes
    feats = {n: np.ones((2, *shapes[n]), dtype=np.float16) for n in shapes}
    labels = np.zeros((2, 32, 32), dtype=np.uint8)

    def broken(*_a, **_k):
        raise OSError("connection reset")

    # zarr's store opens its own (asynchronous) instance and wraps its methods when it opens
    monkeypatch.setattr(type(fs), "pipe_file", broken)
    store = open_store(s, "train")
    with pytest.raises(DataError, match=rf"{url}/train.zarr: cannot write shard 0: OSError: connection reset"):
        store.write_shard(0, feats, labels)
    assert not store.shard_done(0) and store.n_done() == 0
    monkeypatch.undo()
    store = open_store(s, "train")
    store.write_shard(0, feats, labels)
    assert store.shard_done(0) and not store.shard_done(1)
    assert np.array_equal(open_store(s, "train").native(1)["t10_b1"], np.ones(store.shapes["t10_b1"]))
    # the other shards are filled by the stage, the hand-written one is kept
    assert extract_shards(s, {"variant": "ddpm", "split": "train", "shards": [0, 1]}, Reporter()) == 2


def test_reports_on_a_url_equal_the_local_files(tmp_path):
    from ddps_core.metrics import REPORT_COLUMNS, write_report

    df = pd.DataFrame({c: [None] for c in REPORT_COLUMNS}).assign(scope="summary", miou=0.5)
    url = f"memory://ddps-{uuid.uuid4().hex[:8]}/reports/x.parquet"
    write_report(df, url)
    write_report(df, tmp_path / "x.parquet")
    assert storage.read_bytes(url) == (tmp_path / "x.parquet").read_bytes()
    storage.write_text(f"file://{tmp_path}/m.json", '{"a": 1}')  # file:// is a local path
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("url, phrase", [
    ("nosuch://bucket/features", "no fsspec implementation is known for protocol 'nosuch'"),
    ("gcs://bucket/features", "the fsspec implementation of protocol 'gcs' is not installed"),
])
def test_a_url_without_an_implementation_is_one_config_error(url, phrase):
    with pytest.raises(ConfigError, match=f"features.out: {url}: {phrase}"):
        parse_settings({"features": {"out": url}})
    with pytest.raises(ConfigError, match=f"evaluate.reports: {url}: {phrase}"):
        parse_settings({"evaluate": {"reports": url}})
    with pytest.raises(ConfigError, match=f"^{url}: {phrase}"):
        FeatureStore.open(url)


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 with fake credentials in the environment; yields
    a new bucket's URL."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"ddps-test-{uuid.uuid4().hex[:8]}"  # moto's backend outlives its server in this process
    fs.mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_checks_on_s3_see_the_shards_written_since_the_last_listing(s3):
    """zarr writes through its own filesystem instance; the store's listings and sizes must
    not come from the other instance's cache of an earlier listing."""
    url = f"{s3}/resume.zarr"
    store = FeatureStore.create(url, model_id="m", steps=[3], blocks=[0], image_size=4, shapes={"t3_b0": (2, 4, 4)},
                                image_ids=["a", "b", "c"], shard_images=1)
    store.write_shard(0, {"t3_b0": np.ones((1, 2, 4, 4))})
    assert store.check() == []  # lists the folders (the filesystem instance caches the listing)
    # another process's writer: another filesystem instance (other options), another cache
    other = FeatureStore.open(url, storage_options={"default_block_size": 5 * 2**20}, token=store.token)
    other.write_shard(1, {"t3_b0": np.zeros((1, 2, 4, 4))})
    other.write_shard(2, {"t3_b0": np.ones((1, 2, 4, 4))})
    assert store.check() == [] and store.verify() == [] and store.is_complete()
    assert FeatureStore.open(url, read_only=True).native(1)["t3_b0"].sum() == 0


def test_extraction_and_ensemble_on_s3_equal_the_local_run(project, tmp_path, s3):
    """Extraction, teacher training, labelling and the evaluate report with the stores and the
    reports on S3 (moto on loopback) give the local run's arrays, report and metrics."""

    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    root, raw = project
    runs = {}
    for name, out, reports in (("local", tmp_path / "f", tmp_path / "reports"),
                               ("s3", f"{s3}/features", f"{s3}/reports")):
        s = _settings(raw, out, teacher={"baselines": [], "members": 2, "max_epochs": 2,
                                         "out": str(tmp_path / name / "ens"),
                                         "labels_out": str(tmp_path / name / "labels")},
                      evaluate={"reports": str(reports), "student": False}, report={"overlays": 1})
        for stage in ("extract", "train_teacher", "label", "evaluate", "report"):
            stages.get(stage).run(s)
        runs[name] = s
    local, remote = runs["local"], runs["s3"]
    for split in ("train", "test"):
        files = _local_files(Path(store_path(local, split)))
        objects = _remote_files(str(store_path(remote, split)))
        assert sorted(objects) == sorted(files) and all(objects[k] == files[k] for k in files)
    from safetensors.numpy import load_file

    weights = [load_file(tmp_path / name / "ens" / "ensemble.safetensors") for name in ("local", "s3")]
    assert sorted(weights[0]) == sorted(weights[1])
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])  # trained alike
    report = pd.read_parquet(tmp_path / "reports" / "evaluate.parquet")
    import io

    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(storage.read_bytes(f"{s3}/reports/evaluate.parquet"))),
                                  report)
    metrics = json.loads(storage.read_bytes(f"{s3}/reports/metrics/evaluate.json"))
    assert metrics == json.loads((tmp_path / "reports" / "metrics" / "evaluate.json").read_text())
    assert metrics["teacher"]["miou"] == pytest.approx(100 * report.query("scope == 'summary'")["miou"].iloc[0], abs=1e-4)
    assert storage.exists(f"{s3}/reports/figures/overlays/teacher_{open_store(local, 'test').image_ids[0]}.png")
    # a bucket that does not exist: one line naming the URL
    with pytest.raises(DataError, match=r"^s3://no-such-bucket-ddps/features/train.zarr: cannot "):
        run_stage(_settings(raw, "s3://no-such-bucket-ddps/features"))
