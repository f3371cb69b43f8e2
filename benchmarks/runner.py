"""``python -m benchmarks run [--only NAME] [--device cuda]``: every figure beside its baseline.

``gpu`` (:mod:`benchmarks.bench_gpu`) runs only with ``--device cuda``.

Each benchmark measures its figure and its baseline in the same process (so the ratio holds on
a noisy machine), as the median of several repeats after a warm-up. Results go to
``reports/benchmarks.parquet`` (one row per figure) and are printed as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from ddps_core.io import atomic_path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["name", "figure", "value", "unit", "baseline", "baseline_value", "ratio", "target",
           "device", "settings", "git_commit", "date", "machine"]


def _mbiou(device: str) -> list[dict]:
    from benchmarks import bench_mbiou

    res = bench_mbiou.run(references=("bool", "maxpool"), slow_s=20.0)
    rows = []
    for method, label in (("bool", "K x d boolean erosions"), ("maxpool", "K x d max_pool2d erosions (reference)")):
        rows.append({
            "name": f"mbiou/{method}", "figure": "seconds (20 images 512x512, K=150)",
            "value": res["ours_s"], "unit": "s", "baseline": label,
            "baseline_value": res[f"{method}_s"], "ratio": res[f"{method}_ratio"],
            "target": ">= 200x", "settings": {k: res[k] for k in ("n_images", "size", "num_classes", "d", "repeats")}
            | {"baseline_repeats": res[f"{method}_repeats"]},
        })
    return rows


def _unet(device: str) -> list[dict]:
    from benchmarks import bench_unet

    return bench_unet.run(device=device)


def _extract(device: str) -> list[dict]:
    from benchmarks import bench_extract

    # the default preset, and a 2x wider one (4x the FLOPs, 2x the bytes): does the store's
    # per-byte cost shrink relative to the forwards as the model grows? And the pixel
    # sampler's read rate from such a store.
    return (bench_extract.run() + bench_extract.run(n_images=64, overrides={"num_channels": 64})
            + bench_extract.run_sampler())


def _ensemble(device: str) -> list[dict]:
    from benchmarks import bench_ensemble

    return bench_ensemble.run()


def _student(device: str) -> list[dict]:
    from benchmarks import bench_student

    return bench_student.run(device=device)


BENCHMARKS: dict[str, Callable[[str], list[dict]]] = {"mbiou": _mbiou, "unet": _unet,
                                                      "extract": _extract, "ensemble": _ensemble,
                                                      "student": _student}


def _ddps(device: str) -> list[dict]:
    from benchmarks import bench_ddps

    return bench_ddps.run(device=device)


BENCHMARKS["ddps"] = _ddps


def _pipeline(device: str) -> list[dict]:
    from benchmarks import bench_pipeline

    return bench_pipeline.run()


BENCHMARKS["pipeline"] = _pipeline


def _label_stream(device: str) -> list[dict]:
    from benchmarks import bench_label_stream

    return bench_label_stream.run()


BENCHMARKS["label_stream"] = _label_stream


def _active(device: str) -> list[dict]:
    from benchmarks import bench_active

    return bench_active.run()


BENCHMARKS["active"] = _active


def _gpu(device: str) -> list[dict]:
    from benchmarks import bench_gpu

    return bench_gpu.run(device=device)


BENCHMARKS["gpu"] = _gpu
GPU_ONLY = {"gpu"}  # not part of a CPU run; asking for one without --device cuda is an error


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(only: list[str] | None, device: str, out: Path) -> pd.DataFrame:
    names = only or [n for n in BENCHMARKS if device == "cuda" or n not in GPU_ONLY]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    if device != "cuda" and GPU_ONLY & set(names):
        raise SystemExit(f"benchmark(s) {sorted(GPU_ONLY & set(names))} need --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    machine = (torch.cuda.get_device_name() if device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rows = []
    for name in names:
        for row in BENCHMARKS[name](device):
            row.setdefault("target", None)
            row["settings"] = json.dumps(row.get("settings", {}), sort_keys=True, default=str)
            row.update(device=device, git_commit=_commit(), machine=machine,
                       date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
            rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    if out.exists():  # keep the other benchmarks' latest rows
        old = pd.read_parquet(out)
        df = pd.concat([old[~old["name"].isin(df["name"])], df], ignore_index=True)
    with atomic_path(out) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def _fmt(value, spec: str) -> str:
    return "" if value is None or pd.isna(value) else format(value, spec)


def print_table(df: pd.DataFrame) -> None:
    table = Table(title="benchmarks")
    for col in ("name", "value", "unit", "baseline", "baseline_value", "ratio", "target", "device"):
        table.add_column(col)
    for r in df.itertuples():
        table.add_row(r.name, _fmt(r.value, ".4g"), _fmt(r.unit, ""), _fmt(r.baseline, ""),
                      _fmt(r.baseline_value, ".4g"), _fmt(r.ratio, ".3g"), _fmt(r.target, ""), r.device)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run benchmarks")
    p.add_argument("--only", action="append", help=f"one of {sorted(BENCHMARKS)} (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks.parquet")
    args = parser.parse_args(argv)
    print_table(run(args.only, args.device, args.out))


if __name__ == "__main__":
    main(sys.argv[1:])
