"""Deployments: prefect.yaml (one per stage flow, pools by task tags), the `pipeline` flow,
`ddps deploy`, and (slow) a real server + process worker running the extract deployment."""

from __future__ import annotations

import os
import re
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

from ddps_core.errors import ConfigError
from flows import deploy as deploy_mod
from flows.deploy import DeployError

REPO = Path(__file__).resolve().parents[1]


def _spec():
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _gpu_tagged(module, seen=None) -> bool:
    """Does a flow of ``module`` run a task tagged gpu (directly or through a subflow)?"""
    from prefect import Flow, Task

    seen = set() if seen is None else seen
    seen.add(module.__name__)
    for value in vars(module).values():
        if isinstance(value, Task) and "gpu" in value.tags:
            return True
        if isinstance(value, Flow):
            sub = sys.modules[value.fn.__module__]
            if sub.__name__ not in seen and _gpu_tagged(sub, seen):
                return True
    return False


def _dvc_stage_modules() -> dict[str, str]:
    """DVC stage -> the flows module its command runs (``python -m flows.<module>``)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = {}
    for name, stage in stages.items():
        match = re.search(r"-m (flows\.\w+)", stage["cmd"])
        assert match, f"dvc.yaml: stages.{name}.cmd runs no flows module"
        modules[name] = match.group(1)
    return modules


def test_prefect_yaml_deploys_every_flow_on_the_pool_of_its_tasks():
    from prefect.flows import load_flow_from_entrypoint

    spec = _spec()
    assert spec["build"] is None and spec["push"] is None
    # code comes from the checkout: the only pull step keeps the job's working_dir
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]
    deployed = {}
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        module = sys.modules[flow.fn.__module__]
        assert d["entrypoint"] == f"{module.__name__}.{flow.fn.__name__}"
        assert flow.name not in deployed, f"{flow.name} deployed twice"
        deployed[flow.name] = d
        pool = d["work_pool"]["name"]
        assert pool == ("gpu" if _gpu_tagged(module) else "cpu"), d["name"]
        jv = d["work_pool"]["job_variables"]
        assert jv["working_dir"] == "{{ $DDPS_PROJECT_DIR }}"
        assert "gpu" not in d.get("tags", [])  # a run's tags would reach its tasks' limit
    # one deployment per DVC stage, of the flow its command runs (that module's `__main__`
    # calls it), plus the pipeline
    modules = _dvc_stage_modules()
    entry = {d["name"]: d["entrypoint"] for d in spec["deployments"]}
    assert set(entry) == set(modules) | {"pipeline"}
    for stage, module in modules.items():
        assert entry[stage].rsplit(".", 1)[0] == module, stage
        assert entry[stage].rsplit(".", 1)[1] in (REPO / (module.replace(".", "/") + ".py")).read_text().split(
            'if __name__ == "__main__":')[-1], stage
    assert entry["pipeline"] == "flows.pipeline.pipeline_flow"
    pools = {d["name"]: d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools["data"] == pools["evaluate"] == "cpu"
    assert pools["extract"] == pools["train_ddpm"] == pools["refine"] == pools["pipeline"] == "gpu"


# --------------------------------------------------------------------------- pipeline
@pytest.fixture
def stub_stages(monkeypatch):
    """Replace every stage flow of the pipeline by a recorder that reads its settings."""
    from flows import pipeline
    from flows.common import settings_for

    calls = []
    for stage, name, section in pipeline.STAGES:
        def stub(_stage=stage, _section=section, **kwargs):
            own = {_section: kwargs.get(_section)} if _section else {}
            s = settings_for(kwargs["params_path"], own)
            calls.append({"stage": _stage, "kwargs": kwargs, "features_out": s.features.out,
                          "data_out": s.data.out, "ddps_steps": s.refiner.steps})
            return f"{_stage} done"

        monkeypatch.setattr(pipeline, name, stub)
    return calls


@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_runs_the_dvc_stages_in_order_with_every_override(stub_stages, tmp_path):
    from flows.pipeline import pipeline_flow

    params = tmp_path / "params.yaml"
    params.write_text("ddps:\n  steps: 7\nfeatures:\n  out: from_file\n")
    result = pipeline_flow(data={"out": str(tmp_path / "ds")}, features={"out": "feats"},
                           params_path=str(params))
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert [c["stage"] for c in stub_stages] == stages
    assert result == {s: f"{s} done" for s in stages}
    by_stage = {c["stage"]: c for c in stub_stages}
    # each stage gets its own section's overrides ...
    assert by_stage["extract"]["kwargs"]["features"] == {"out": "feats"}
    assert by_stage["data"]["kwargs"]["data"] == {"out": str(tmp_path / "ds")}
    assert by_stage["train_ensemble"]["kwargs"]["ensemble"] is None
    assert set(by_stage["evaluate"]["kwargs"]) == {"params_path"}
    # ... and every stage sees every section's overrides over the file (train_ensemble reads
    # the stores at features.out), and the file's other values
    for c in stub_stages:
        assert (c["features_out"], c["data_out"], c["ddps_steps"]) == ("feats", str(tmp_path / "ds"), 7)
    assert not Path(by_stage["data"]["kwargs"]["params_path"]).exists()  # the temporary copy is gone


@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_without_overrides_passes_params_path_and_bad_key_stops_before_any_stage(stub_stages, tmp_path):
    from flows.pipeline import pipeline_flow

    pipeline_flow(params_path=str(tmp_path / "none.yaml"))
    assert {c["kwargs"]["params_path"] for c in stub_stages} == {str(tmp_path / "none.yaml")}
    stub_stages.clear()
    with pytest.raises(ConfigError, match=r"ddps\.stepz: unknown key"):
        pipeline_flow(data={"out": "x"}, ddps={"stepz": 3})
    assert stub_stages == []


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
                                     "random_unet": False})
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
        assert "deployment extract_features/extract -> gpu" in proc.stdout
        assert proc.stdout.count("\ndeployment ") == len(_spec()["deployments"])
        api_client = httpx.Client(base_url=api, timeout=30)
        limit = api_client.get("/concurrency_limits/tag/gpu").json()
        assert limit["concurrency_limit"] == 1
        assert api_client.get("/work_pools/cpu").json()["type"] == "process"
        dep = api_client.get("/deployments/name/extract_features/extract").json()
        assert dep["job_variables"]["working_dir"] == str(project)

        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"],
            cwd=REPO, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        # two writers for 3 training images in shards of 2: two gpu tasks the limit serialises;
        # and a run with an out-of-range parameter, which must fail naming the key
        good = api_client.post(f"/deployments/{dep['id']}/create_flow_run",
                               json={"parameters": {"features": {"workers": 2}}}).json()["id"]
        bad = api_client.post(f"/deployments/{dep['id']}/create_flow_run",
                              json={"parameters": {"features": {"shard_images": 0}}}).json()["id"]
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
        # server holds only these runs; the bad one ran no task; the writers may run in a subflow)
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
