"""SIGKILL a stage subprocess at chosen progress points, and check the files it leaves."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PREFIX = "@@ "


def is_temporary(path: Path) -> bool:
    """A temporary of ``atomic_path`` (``.<name>.<random>.tmp``) or a ``*.partial`` file."""
    return (path.name.startswith(".") and path.name.endswith(".tmp")) or ".partial" in path.name


def files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def _safetensors_hash(path: Path) -> str:
    """The tensors' names, dtypes, shapes and bytes and the metadata, in sorted order: the
    file's bytes are not reproducible across processes (safetensors writes the metadata
    mapping in hash order), its content is."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as fh:
        h.update(json.dumps(fh.metadata() or {}, sort_keys=True).encode())
        for key in sorted(fh.keys()):
            t = fh.get_tensor(key).contiguous()
            h.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.view(-1).view(torch_uint8()).numpy().tobytes() if t.numel() else b"")
    return "safetensors:" + h.hexdigest()


def torch_uint8():
    import torch

    return torch.uint8


def digest(roots: list[Path]) -> dict[str, str]:
    """``relative path -> sha256`` of every file that is not a temporary, under each root
    (of the content, for ``.safetensors``)."""
    out = {}
    for root in roots:
        for p in files(root):
            if not is_temporary(p):
                out[f"{root.name}/{p.relative_to(root)}"] = (
                    _safetensors_hash(p) if p.suffix == ".safetensors" else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def temporaries(roots: list[Path]) -> list[str]:
    return [str(p) for root in roots for p in files(root) if is_temporary(p)]


def check_final_files_parse(roots: list[Path]) -> int:
    """Every file under a final name (not a temporary, not inside a Zarr store: those are
    checked by opening the store) parses; returns how many were read."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    n = 0
    for root in roots:
        for p in files(root):
            if is_temporary(p) or any(part.endswith(".zarr") for part in p.relative_to(root).parts[:-1]):
                continue
            suffix = p.suffix
            if suffix == ".json":
                json.loads(p.read_text())
            elif suffix == ".parquet":
                pd.read_parquet(p)
            elif suffix in (".png", ".jpg"):
                with Image.open(p) as im:
                    im.load()
            elif suffix == ".safetensors":
                load_file(p)
            elif suffix == ".pt":
                torch.load(p, map_location="cpu", weights_only=True)
            elif suffix == ".npy":
                np.load(p)
            elif suffix in (".yaml", ".txt", ".md", ".csv"):
                p.read_text()
            else:
                continue
            n += 1
    return n


@dataclass
class Kill:
    target: int  # index into the reference run's markers
    delay: float  # seconds slept after that marker appeared
    seen: str = ""  # the marker that triggered the kill
    killed: bool = False


@dataclass
class KillRun:
    kills: list[Kill] = field(default_factory=list)
    final_markers: list[str] = field(default_factory=list)


def spawn(stage: str, settings_file: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.faults.driver", stage, str(settings_file)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def choose_kills(markers: list[str], seconds: float, n: int, seed: int) -> list[Kill]:
    """``n`` distinct kill points: sorted random marker indices (not the last) and a random
    delay after each, up to half the mean time between two markers of the reference run."""
    rng = random.Random(seed)
    candidates = list(range(len(markers) - 1))
    assert len(candidates) >= n, f"only {len(candidates)} progress markers, {n} kills wanted"
    gap = seconds / max(len(markers), 1)
    return [Kill(t, round(rng.uniform(0.0, 0.5 * gap), 3)) for t in sorted(rng.sample(candidates, n))]


def kill_then_finish(stage: str, settings: Any, workdir: Path, markers: list[str], kills: list[Kill],
                     after_kill=None, timeout: float = 240.0) -> KillRun:
    """Run ``stage`` once per kill, SIGKILLing it ``delay`` s after the first marker at or past
    the target (markers are positions in the reference run), calling ``after_kill(kill)``; then
    run it to completion. All runs share the output folders of ``settings``."""
    index = {}
    for i, m in enumerate(markers):
        index.setdefault(m, i)
    settings_file = workdir / f"{stage}-settings.json"
    settings_file.write_text(json.dumps(settings.model_dump(mode="json")))
    result = KillRun()
    for kill in kills:
        proc = spawn(stage, settings_file)
        deadline = time.monotonic() + timeout
        try:
            for line in proc.stdout:  # the driver flushes after every marker
                if not line.startswith(PREFIX):
                    continue
                m = line[len(PREFIX):].strip()
                if index.get(m, -1) >= kill.target:
                    kill.seen = m
                    time.sleep(kill.delay)
                    break
                assert time.monotonic() < deadline, f"{stage}: no marker past {kill.target} in {timeout} s"
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kill.killed = True
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert kill.killed, f"{stage}: the run ended (rc {proc.returncode}) before kill {kill}: {err[-2000:]}"
        assert proc.returncode == -signal.SIGKILL
        result.kills.append(kill)
        if after_kill is not None:
            after_kill(kill)
    proc = spawn(stage, settings_file)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{stage}: the final rerun failed (rc {proc.returncode}): {err[-3000:]}"
    print(f"{stage}: killed at", [(k.seen, k.delay) for k in result.kills])
    result.final_markers = [ln[len(PREFIX):].strip() for ln in out.splitlines() if ln.startswith(PREFIX)]
    assert result.final_markers[-1] == "finished"
    return result


def reference(stage: str, settings: Any) -> tuple[list[str], float, dict[str, Any]]:
    """The uninterrupted run, in this process: its markers, seconds and summary."""
    from tests.faults.driver import run

    markers: list[str] = []
    t0 = time.monotonic()
    summary = run(stage, settings, markers.append)
    return markers, time.monotonic() - t0, summary
