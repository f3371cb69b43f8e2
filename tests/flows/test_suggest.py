"""Flow ``suggest``: the same run as ``ddps suggest`` as a task tagged gpu, the batch published
as a markdown artifact with thumbnails; its deployment is on the gpu pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import pool_workspace

pytestmark = pytest.mark.usefixtures("prefect_harness", "one_thread")
REPO = Path(__file__).resolve().parents[2]


def test_the_suggest_flow_writes_the_batch_and_publishes_it(tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.suggest import suggest

    pool_workspace(tmp_path)
    out = tmp_path / "batch"
    summary = suggest(n=3, out=str(out), candidates=15, params_path=str(tmp_path / "params.yaml"))
    assert summary["picked"] == 3 and len(list((out / "prelabels").glob("*.png"))) == 3
    with get_client(sync_client=True) as client:
        found = {key: max(client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))),
                          key=lambda a: a.created)
                 for key in ("suggest-batch", "suggest-summary")}
    page = found["suggest-batch"].data
    # one row per pick, each with three thumbnails (image, pre-label, uncertainty) and its reason
    rows = [line for line in page.splitlines() if line.startswith("| ") and "data:image/png;base64," in line]
    assert len(rows) == 3 and all(row.count("data:image/png;base64,") == 3 for row in rows)
    assert f"ddps data add-labels {out}" in page and "most uncertain image" in rows[0]
    table = found["suggest-summary"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [r["image_id"] for r in table] == [p["image_id"] for p in summary["picks"]]


def test_the_suggest_deployment_is_on_the_gpu_pool_and_its_task_is_tagged_gpu():
    from prefect.flows import load_flow_from_entrypoint

    from tasks.suggest import suggest_task

    d = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}["suggest"]
    assert d["work_pool"]["name"] == "gpu" and "gpu" not in d.get("tags", [])
    flow = load_flow_from_entrypoint(d["entrypoint"])
    assert flow.name == "suggest" and {"n", "out", "candidates", "near_copy"} <= set(flow.parameters.properties)
    assert set(suggest_task.tags) == {"suggest", "gpu"}
