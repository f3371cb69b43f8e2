"""Flow ``pipeline``: every stage's flow, in pipeline order, as subflows of one run.

It takes the stage flows' parameters, ``overrides`` and ``params_path``, validates the
settings once before the first stage (a bad key fails the run at once, naming the key), and
passes both on to every stage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import stages
from flows.common import settings_for


@flow(name="pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Every stage, data to evaluate; returns each stage's summary by stage."""
    settings_for(params_path, overrides)
    results: dict[str, Any] = {}
    for name, stage_flow in stages.FLOWS.items():
        print(f"stage {name}")
        results[name] = stage_flow(overrides=overrides, params_path=params_path)
    return results
