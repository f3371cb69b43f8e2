"""Flow ``predict``: the same run as ``ddps predict`` as a task tagged gpu, its summary and
pictures published as artifacts; unreadable images fail the run after the others are written
and the artifacts published; its deployment is on the gpu pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ddps_core.predict import run
from tests.predict.fakes import FakePredictor, fake_labels, quadrants

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parents[2]


def _latest(key):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, key
    return max(found, key=lambda a: a.created)


def test_the_predict_flow_writes_the_outputs_and_publishes_its_artifacts(tmp_path, monkeypatch):
    from flows.predict import predict

    fake = FakePredictor()
    loaded = []
    monkeypatch.setattr(run, "_load", lambda s, model, device=None: loaded.append((model, device)) or fake)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (h, w) in enumerate([(20, 30), (31, 17), (16, 16)]):
        Image.fromarray(quadrants(h, w, i)).save(folder / f"im{i}.png")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    params = tmp_path / "params.yaml"
    params.write_text("device: auto\n")
    out = tmp_path / "out"

    state = predict(inputs=[str(folder)], out=str(out), model="refiner", overlay=True, uncertainty=True,
                    batch_size=2, device="cpu", params_path=str(params), return_state=True)
    # the bad file fails the run, naming it, after the others are written
    assert state.is_failed() and "1 of 4 images could not be read" in state.message
    assert "bad.jpg: cannot read image (corrupt or not an image): no known image format" in state.message
    assert loaded == [("refiner", "cpu")] and fake.calls == [1, 2]  # bad.jpg, im0 | im1, im2
    for i in range(3):
        image = np.asarray(Image.open(folder / f"im{i}.png"))
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"im{i}.png")), fake_labels(image))
        assert (out / "overlays" / f"im{i}.png").is_file() and (out / "uncertainty" / f"im{i}.png").is_file()
    assert pq.read_table(out / "predictions.parquet").num_rows == 3

    table = _latest("predict-summary")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    summary = next(r for r in rows if r.get("name") == "summary")
    assert (summary["images"], summary["predicted"], summary["failed"], summary["model"]) == (4, 3, 1, "refiner")
    assert any("bad.jpg" in str(r.get("image")) for r in rows)  # the failure's row
    page = _latest("predict-outputs")
    assert page.type == "markdown" and f"`{out / 'predictions.parquet'}`" in page.data
    assert "data:image/png;base64," in page.data and "im0.png" in page.data  # an overlay shown

    # rerun without the bad file: every mask reused, the run completes
    (folder / "bad.jpg").unlink()
    result = predict(inputs=[str(folder)], out=str(out), model="refiner", params_path=str(params))
    assert (result["reused"], result["predicted"], result["failed"]) == (3, 0, 0) and fake.calls == [1, 2]


def test_the_predict_deployment_is_on_the_gpu_pool_and_its_task_is_tagged_gpu():
    from prefect.flows import load_flow_from_entrypoint

    from tasks.predict import predict_task

    spec = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    d = spec["predict"]
    assert d["work_pool"]["name"] == "gpu" and "gpu" not in d.get("tags", [])
    flow = load_flow_from_entrypoint(d["entrypoint"])
    assert flow.name == "predict"
    assert {"inputs", "model", "out", "overlay", "uncertainty", "batch_size"} <= set(flow.parameters.properties)
    assert "inputs" in flow.parameters.required
    assert set(predict_task.tags) == {"predict", "gpu"}
