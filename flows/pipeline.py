"""Flow ``pipeline``: every stage's flow, in pipeline order, as subflows of one run.

It takes the stage flows' parameters, ``overrides`` and ``params_path``, validates the
settings once before the first stage (a bad key fails the run at once, naming the key), and
passes both on to every stage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import stages
from flows.common import failed_state, settings_for


@flow(name="pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> Any:
    """Every stage, data to evaluate; returns each stage's summary by stage. Bad input ends
    the run Failed with its one line as the state's message."""
    results: dict[str, Any] = {}
    try:
        settings_for(params_path, overrides)
        for name, stage_flow in stages.FLOWS.items():
            print(f"stage {name}")
            results[name] = stage_flow(overrides=overrides, params_path=params_path)
    except Exception as exc:
        state = failed_state(exc)
        if state is None:
            raise
        return state
    return results
