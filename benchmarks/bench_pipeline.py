"""Benchmark: the end-to-end pipeline, stage by stage (issue 9, figure 7).

Running ``dvc repro`` takes a quarter of an hour, so this benchmark does not run it again:
it reads the stage times that the last ``make run`` measured (``reports/run_times.json``,
written by ``flows.run`` from the ``Running stage`` lines dvc prints). One row per stage
that ran, with the whole run as the baseline (the ratio is the stage's share), and one row
for the whole run against the 15-minute goal. Stages dvc skipped (up to date) are left out:
their time says nothing. Without the file there is nothing to report, and ``rows`` says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flows import run as make_run  # noqa: E402  (light: no Prefect import)

TIMES = REPO / make_run.TIMES  # the file make run's write_times writes
GOAL_S = 15 * 60


class NoRunTimes(FileNotFoundError):
    """``reports/run_times.json`` is missing: no ``make run`` has finished in this checkout."""


def load(path: Path = TIMES) -> dict[str, Any]:
    if not path.exists():
        raise NoRunTimes(f"{path} does not exist: run `make run` first (it writes the stage times)")
    try:
        record = json.loads(path.read_text())
        stages = record["stages"]
        total = float(record["total_s"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a make-run time record ({exc})") from exc
    if not isinstance(stages, list) or total <= 0:
        raise ValueError(f"{path}: not a make-run time record (stages {type(stages).__name__}, total {total})")
    return record


def rows(path: Path = TIMES) -> list[dict]:
    record = load(path)
    total = float(record["total_s"])
    ran = [s for s in record["stages"] if s.get("ran")]
    settings = {"run_date": record.get("date"), "run_machine": record.get("machine"),
                "skipped": [s["stage"] for s in record["stages"] if not s.get("ran")],
                "server_start_s": record.get("server_start_s"), "source": str(path.relative_to(REPO))
                if path.is_relative_to(REPO) else str(path)}
    out = [{
        "name": f"pipeline/{s['stage']}", "figure": "stage wall time of the last make run",
        "value": float(s["seconds"]), "unit": "s", "baseline": "whole make run (dvc repro)",
        "baseline_value": total, "ratio": float(s["seconds"]) / total, "settings": settings,
    } for s in ran]
    out.append({
        "name": "pipeline/total", "figure": "make run wall time after the install (all stages ran)"
        if len(ran) == len(record["stages"]) else "make run wall time (some stages skipped)",
        "value": total, "unit": "s", "baseline": "the 15-minute goal", "baseline_value": float(GOAL_S),
        "ratio": total / GOAL_S, "target": "<= 1x (install not included)", "settings": settings,
    })
    return out


def run() -> list[dict]:
    try:
        return rows()
    except NoRunTimes as exc:
        print(f"pipeline: skipped, {exc}")
        return []


if __name__ == "__main__":
    for r in rows():
        print(f"{r['name']:<28} {r['value']:8.1f} s  {r['ratio']:.2f} of {r['baseline']}")
