"""``ddps deploy``: work pools, the ``gpu`` concurrency limit and the deployments of
``prefect.yaml``, created against the current Prefect API (``PREFECT_API_URL``).

Every step is idempotent: an existing pool is kept as it is (its type must be ``process``),
the tag limit is set to the requested value, and ``prefect deploy`` updates deployments in
place. The deployments themselves are made by ``prefect --no-prompt deploy`` run on the
checkout's ``prefect.yaml``, so that file stays the one description of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddps_core.errors import DDPSError

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "prefect.yaml"
POOLS = ("cpu", "gpu")
POOL_TYPE = "process"
GPU_TAG = "gpu"
# prefect.yaml's `working_dir` and env defaults read this at deploy time.
PROJECT_ENV = "DDPS_PROJECT_DIR"


class DeployError(DDPSError):
    """The Prefect API is missing or unreachable, or a pool or deployment cannot be made."""


@dataclass
class DeployResult:
    api_url: str
    pools: dict[str, str] = field(default_factory=dict)  # pool -> "created" | "exists"
    gpu_limit: int | None = None
    deployments: list[str] = field(default_factory=list)  # "flow/deployment -> pool"


def api_url() -> str:
    """The configured ``PREFECT_API_URL`` (environment or Prefect profile)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise DeployError("PREFECT_API_URL is not set: start a server (prefect server start --host "
                          "127.0.0.1) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return str(url).rstrip("/")


def check_server(url: str, timeout: float = 5.0) -> None:
    """Fail with one line unless ``url``/health answers."""
    import httpx

    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise DeployError(f"PREFECT_API_URL={url}: the Prefect server is unreachable "
                          f"({type(exc).__name__}: {exc or 'no answer'})") from None
    if response.status_code != 200:
        raise DeployError(f"PREFECT_API_URL={url}: {url}/health answered HTTP {response.status_code}; "
                          "is this a Prefect API URL (ending in /api)?")


def deployment_specs(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` entries of ``prefect_file``."""
    if not prefect_file.is_file():
        raise DeployError(f"{prefect_file}: not found (ddps deploy reads the checkout's prefect.yaml)")
    try:
        spec = yaml.safe_load(prefect_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DeployError(f"{prefect_file}: not valid YAML ({exc})") from None
    deployments = spec.get("deployments") if isinstance(spec, dict) else None
    if not isinstance(deployments, list) or not deployments:
        raise DeployError(f"{prefect_file}: deployments: expected a non-empty list")
    return deployments


def ensure_pools(client: Any, names: Sequence[str] = POOLS) -> dict[str, str]:
    """Create the process work pools that are missing; an existing one must be ``process``."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    done: dict[str, str] = {}
    for name in names:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=POOL_TYPE,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description=f"ddps {name} stages (process workers started from the checkout)"))
            done[name] = "created"
            continue
        if pool.type != POOL_TYPE:
            raise DeployError(f"work pool {name!r} exists with type {pool.type!r}; ddps needs a "
                              f"{POOL_TYPE!r} pool of that name (delete it or rename it)")
        done[name] = "exists"
    return done


def set_gpu_limit(client: Any, limit: int) -> int:
    """Task runs tagged ``gpu`` run at most ``limit`` at a time (server-wide)."""
    if limit < 1:
        raise DeployError(f"--gpu-limit: must be at least 1 (got {limit})")
    client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)  # an upsert
    return limit


def run_prefect_deploy(url: str, project: Path, names: Sequence[str] | None,
                       prefect_file: Path = PREFECT_FILE,
                       run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
                       timeout: float = 900) -> None:
    """``prefect --no-prompt deploy`` of every deployment (or of ``names``) in ``prefect_file``."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    if names:
        for name in names:
            cmd += ["--name", name]
    else:
        cmd.append("--all")
    env = {**os.environ, "PREFECT_API_URL": url, PROJECT_ENV: str(project)}
    try:
        proc = run(cmd, cwd=prefect_file.parent, env=env, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"prefect deploy ({prefect_file}) did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DeployError(f"prefect deploy failed ({prefect_file}): {last}")


def deploy(project: Path, gpu_limit: int = 1, pools: bool = True, names: Sequence[str] | None = None,
           prefect_file: Path = PREFECT_FILE) -> DeployResult:
    """Pools, the gpu limit and the deployments; ``project`` is the deployments' default
    working directory (its params.yaml and data/)."""
    from prefect import get_client

    project = Path(project).resolve()
    if not project.is_dir():
        raise DeployError(f"--project {project}: not a directory")
    specs = deployment_specs(prefect_file)
    known = [str(d.get("name")) for d in specs]
    for name in names or []:
        if name not in known:
            raise DeployError(f"--name {name}: no such deployment in {prefect_file} "
                              f"(known: {', '.join(known)})")
    url = api_url()
    check_server(url)
    result = DeployResult(api_url=url)
    with get_client(sync_client=True) as client:
        if pools:
            result.pools = ensure_pools(client)
        result.gpu_limit = set_gpu_limit(client, gpu_limit)
    run_prefect_deploy(url, project, names, prefect_file)
    with get_client(sync_client=True) as client:
        for spec in specs:
            if names and spec.get("name") not in names:
                continue
            entry = str(spec.get("entrypoint", ""))
            flow_name = _flow_name(entry)
            d = client.read_deployment_by_name(f"{flow_name}/{spec['name']}")
            result.deployments.append(f"{flow_name}/{d.name} -> {d.work_pool_name}")
    return result


def _flow_name(entrypoint: str) -> str:
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint).name
