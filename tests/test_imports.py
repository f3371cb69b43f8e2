"""Importing any module of the project changes no process-wide setting: torch's threads,
default dtype and determinism flags, numpy's error handling, zarr's config, the environment,
signal handlers, the root logger, warnings filters and the allocator settings are the same
before and after importing every module of ``ddps_core``, ``ddps``, ``flows``, ``tasks`` and
``benchmarks`` (their third-party dependencies imported, and Prefect's decorators used,
first: what those do is theirs)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, json, logging, os, pkgutil, signal, sys, warnings
import numpy, torch, zarr, prefect, pandas, pyarrow, scipy.ndimage, scipy.spatial  # third-party first
from prefect import flow, task

@task
def _t():  # Prefect sets its logging up the first time its decorators are used, in any program
    pass

def state():
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
        "torch_dtype": str(torch.get_default_dtype()),
        "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "numpy_err": numpy.geterr(),
        "zarr": json.dumps(zarr.config.get("array"), sort_keys=True, default=str),
        "zarr_async": json.dumps(zarr.config.get("async"), sort_keys=True, default=str),
        "env": dict(os.environ),
        "signals": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)},
        "root_level": logging.getLogger().level,
        "root_handlers": [type(h).__name__ for h in logging.getLogger().handlers],
        "warnings": len(warnings.filters),
        "recursion": sys.getrecursionlimit(),
    }

before = state()
names = []
for pkg in ("ddps_core", "ddps", "flows", "tasks", "benchmarks"):
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name.endswith(".__main__"):  # an entry point: importing it runs it
            continue
        importlib.import_module(info.name)
        names.append(info.name)
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
if "env" in changed:
    b, a = changed["env"]
    changed["env"] = {k: (b.get(k), a.get(k)) for k in set(b) | set(a) if b.get(k) != a.get(k)}
print(json.dumps({"modules": names, "changed": changed}, default=str))
"""


def test_importing_every_module_changes_no_process_wide_setting():
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["modules"]) > 60  # every module was imported, not a few packages
    assert {"ddps_core.features.store", "flows.stages", "tasks.stage", "ddps.cli"} <= set(out["modules"])
    assert out["changed"] == {}
