"""Deployments: prefect.yaml (one per stage flow, on the pool of the stage's device),
`ddps deploy`, and (slow) a real server + process worker running the extract deployment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ddps_core import stages
from flows import deploy as deploy_mod
from flows.deploy import DeployError

REPO = Path(__file__).resolve().parents[2]


def _spec():
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_deploys_every_stage_flow_on_the_pool_of_its_device():
    from prefect.flows import load_flow_from_entrypoint

    from flows.stages import FLOWS

    spec = _spec()
    assert spec["build"] is None and spec["push"] is None
    # code comes from the checkout: the only pull step keeps the job's working_dir
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]
    entry = {d["name"]: d["entrypoint"] for d in spec["deployments"]}
    # one per DVC stage, the pipeline, predict and suggest
    assert list(entry) == [*stages.ORDER, "pipeline", "predict", "suggest"]
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert flow.name == d["name"]
        if d["name"] not in ("pipeline", "predict", "suggest"):
            assert flow is FLOWS[d["name"]]
            assert d["work_pool"]["name"] == stages.get(d["name"]).device
        assert d["work_pool"]["job_variables"]["working_dir"] == "{{ $DDPS_PROJECT_DIR }}"
        assert "gpu" not in d.get("tags", [])  # a run's tags would reach its tasks' limit
    assert entry["pipeline"] == "flows.pipeline.pipeline"
    pools = {d["name"]: d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools["pipeline"] == pools["predict"] == pools["suggest"] == "gpu"


# --------------------------------------------------------------------------- ddps deploy
class FakeClient:
    def __init__(self, pools):
        self.pools = dict(pools)
        self.created = []
        self.limits = []

    def read_work_pool(self, name):
        from prefect.exceptions import ObjectNotFound

        if name not in self.pools:
            raise ObjectNotFound(RuntimeError("404"))
        return SimpleNamespace(name=name, type=self.pools[name])

    def create_work_pool(self, pool):
        self.created.append(pool)
        self.pools[pool.name] = pool.type

    def create_concurrency_limit(self, tag, concurrency_limit):
        self.limits.append((tag, concurrency_limit))


def test_pools_are_created_once_as_process_pools_and_a_foreign_pool_is_an_error():
    client = FakeClient({"cpu": "process"})
    assert deploy_mod.ensure_pools(client) == {"cpu": "exists", "gpu": "created"}
    (gpu,) = client.created
    assert gpu.name == "gpu" and gpu.type == "process"
    # the process worker's template, so that working_dir and env job variables apply
    assert gpu.base_job_template["job_configuration"]["working_dir"] == "{{ working_dir }}"
    assert {"env", "working_dir"} <= set(gpu.base_job_template["variables"]["properties"])
    assert deploy_mod.ensure_pools(client) == {"cpu": "exists", "gpu": "exists"}
    assert len(client.created) == 1
    with pytest.raises(DeployError, match="work pool 'gpu' exists with type 'docker'"):
        deploy_mod.ensure_pools(FakeClient({"cpu": "process", "gpu": "docker"}))
    assert deploy_mod.set_gpu_limit(client, 2) == 2 and client.limits == [("gpu", 2)]
    with pytest.raises(DeployError, match="--gpu-limit"):
        deploy_mod.set_gpu_limit(client, 0)


def test_prefect_deploy_command_never_prompts_and_reports_the_failure(tmp_path):
    seen = {}

    def run(cmd, cwd, env, **kw):
        seen.update(cmd=cmd, cwd=cwd, env=env, stdin=kw.get("stdin"))
        return subprocess.CompletedProcess(cmd, seen.get("rc", 0), "Deploying...\n",
                                           "ValueError: work pool 'gpu' does not exist\n")

    deploy_mod.run_prefect_deploy("http://127.0.0.1:1/api", tmp_path, None, run=run)
    assert seen["cmd"][1:] == ["-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                               str(REPO / "prefect.yaml"), "--all"]
    assert seen["cwd"] == REPO and seen["stdin"] == subprocess.DEVNULL
    assert seen["env"]["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert seen["env"]["DDPS_PROJECT_DIR"] == str(tmp_path)
    deploy_mod.run_prefect_deploy("u", tmp_path, ["extract", "data"], run=run)
    assert seen["cmd"][-4:] == ["--name", "extract", "--name", "data"]
    seen["rc"] = 1
    with pytest.raises(DeployError, match="prefect deploy failed .*: ValueError: work pool 'gpu' does not exist"):
        deploy_mod.run_prefect_deploy("u", tmp_path, None, run=run)


def test_unknown_deployment_name_is_an_error_before_any_server_call(tmp_path):
    with pytest.raises(DeployError, match=r"--name extrakt: no such deployment .*known: data, train_ddpm, extract"):
        deploy_mod.deploy(tmp_path, names=["extrakt"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddps(args, env, cwd=REPO, timeout=300):
    return subprocess.run([str(Path(sys.executable).parent / "ddps"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def test_deploy_without_api_url_or_server_is_one_line_and_nonzero(tmp_path):
    proc = _ddps(["deploy"], _env(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: PREFECT_API_URL is not set: start a server (prefect server start --host 127.0.0.1) "
        "and export PREFECT_API_URL=http://127.0.0.1:4200/api"]
    url = f"http://127.0.0.1:{_free_port()}/api"
    proc = _ddps(["deploy"], _env(tmp_path, url))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: PREFECT_API_URL={url}: the Prefect server is unreachable")


# --------------------------------------------------------------------------- slow: a real server
def _stop(proc: subprocess.Popen | None, first: int, grace: float) -> None:
    """Stop a process we started (and its session): ``first``, then SIGINT again, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((first, grace), (signal.SIGINT, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
def test_extract_deployment_runs_on_a_process_worker(tmp_path):
    import httpx

    from ddps_core.features.store import FeatureStore
    from tests.helpers import tiny_project

    home, logs, project = tmp_path / "home", tmp_path / "logs", tmp_path / "project"
    for d in (home, logs, project):
        d.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(home, api)
    server = worker = None
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=_env(home), stdout=(logs / "server.log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        # the tiny project while the server starts: 3 labelled, 2 test, 2 pool images
        raw = tiny_project(project, {"n_unlabeled": 2, "n_labeled": 3, "n_test": 2},
                           features={"steps": [10], "blocks": [1, 2], "shard_images": 2, "batch_size": 2,
                                     "splits": ["train", "test", "unlabeled"]},  # every split's store is checked
                           teacher={"baselines": []})
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None, f"server exited:\n{_tail(logs / 'server.log')}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /api/health:\n{_tail(logs / 'server.log')}"
            time.sleep(1)

        proc = _ddps(["deploy", "--project", str(project)], env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "work pool gpu (process): created" in proc.stdout
        assert "deployment extract/extract -> gpu" in proc.stdout
        assert proc.stdout.count("\ndeployment ") == len(_spec()["deployments"])
        api_client = httpx.Client(base_url=api, timeout=30)
        limit = api_client.get("/concurrency_limits/tag/gpu").json()
        assert limit["concurrency_limit"] == 1
        assert api_client.get("/work_pools/cpu").json()["type"] == "process"
        dep = api_client.get("/deployments/name/extract/extract").json()
        assert dep["job_variables"]["working_dir"] == str(project)

        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"],
            cwd=REPO, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        # two writers for 3 training images in shards of 2: two gpu tasks the limit serialises;
        # and a run with an out-of-range parameter, which must fail naming the key
        good = api_client.post(f"/deployments/{dep['id']}/create_flow_run",
                               json={"parameters": {"overrides": {"features.workers": 2}}}).json()["id"]
        bad = api_client.post(f"/deployments/{dep['id']}/create_flow_run",
                              json={"parameters": {"overrides": {"features": {"shard_images": 0}}}}).json()["id"]
        states = {}
        deadline = time.monotonic() + 200
        while len(states) < 2:
            for run_id in (good, bad):
                state = api_client.get(f"/flow_runs/{run_id}").json()["state"]
                if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    states[run_id] = state
            assert worker.poll() is None, f"worker exited:\n{_tail(logs / 'worker.log')}"
            assert time.monotonic() < deadline, f"runs not final: {states}\n{_tail(logs / 'worker.log')}"
            time.sleep(2)
        assert states[good]["type"] == "COMPLETED", f"{states[good]}\n{_tail(logs / 'worker.log')}"
        assert states[bad]["type"] == "FAILED"
        assert "features.shard_images: Input should be greater than or equal to 1" in states[bad]["message"]

        for split in ("train", "test", "unlabeled"):
            store = FeatureStore.open(project / "data" / "features" / f"{split}.zarr")
            assert store.is_complete() and len(store) == {"train": 3, "test": 2, "unlabeled": 2}[split]
        # the gpu-tagged shard writers never overlapped, and released their slots (this fresh
        # server holds only these runs; the bad one ran no task)
        runs = api_client.post("/task_runs/filter", json={
            "task_runs": {"name": {"like_": "extract-shards"}}}).json()
        spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"]))
                       for r in runs)
        assert len(spans) == 4 and all(r["state"]["type"] == "COMPLETED" for r in runs)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), spans
        assert api_client.get("/concurrency_limits/tag/gpu").json()["active_slots"] == []
    finally:
        _stop(worker, signal.SIGINT, 30)  # a process worker ignores SIGTERM
        _stop(server, signal.SIGTERM, 30)
