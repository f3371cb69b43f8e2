"""Flow ``pipeline``: every stage flow in the order of ``dvc.yaml``, as subflows of one run.

Each parameter is a partial override of one section of ``params.yaml``, as the stage flows
take them. All of them are validated before the first stage runs, so a bad key fails the run
at once, naming the key. Every stage then reads the same effective settings (a later stage
reads earlier sections too: ``train_ensemble`` finds the stores at ``features.out``), from a
temporary copy of ``params_path`` with every override applied, and is also passed its own
section's overrides, so that its run shows them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from flows.common import settings_for
from flows.data import data_flow
from flows.evaluate import evaluate_flow
from flows.extract_features import extract_features_flow
from flows.generate import generate_flow
from flows.label import label_flow
from flows.refine import refine_flow
from flows.train_ddpm import train_ddpm_flow
from flows.train_ddps import train_ddps_flow
from flows.train_ensemble import train_ensemble_flow
from flows.train_student import train_student_flow

# (stage, name of the stage flow imported above, the section it takes overrides of); the
# flows are looked up by name when the pipeline runs (a test can replace one).
STAGES: tuple[tuple[str, str, str | None], ...] = (
    ("data", "data_flow", "data"),
    ("train_ddpm", "train_ddpm_flow", "ddpm"),
    ("extract", "extract_features_flow", "features"),
    ("train_ensemble", "train_ensemble_flow", "teacher"),
    ("label", "label_flow", "teacher"),
    ("generate", "generate_flow", "generate"),
    ("train_student", "train_student_flow", "student"),
    ("train_ddps", "train_ddps_flow", "refiner"),
    ("refine", "refine_flow", "refiner"),
    ("evaluate", "evaluate_flow", None),
)


def _write_params(settings: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)
    return path


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    data: dict[str, Any] | None = None,
    ddpm: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
    ensemble: dict[str, Any] | None = None,
    generate: dict[str, Any] | None = None,
    student: dict[str, Any] | None = None,
    ddps: dict[str, Any] | None = None,
    evaluate: dict[str, Any] | None = None,
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """All stages, ``data`` to ``evaluate``. Each section parameter holds partial overrides
    of that section of ``params_path``; returns each stage flow's result by stage."""
    overrides = {"data": data, "ddpm": ddpm, "features": features, "teacher": ensemble,
                 "generate": generate, "student": student, "refiner": ddps, "evaluate": evaluate}
    given = {section: values for section, values in overrides.items() if values}
    settings = settings_for(params_path, given)  # a bad key fails here, before any stage
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ddps-pipeline-") as tmp:
        effective = str(_write_params(settings, Path(tmp) / "params.yaml")) if given else params_path
        for stage, flow_name, section in STAGES:
            stage_flow = globals()[flow_name]
            kwargs: dict[str, Any] = {"params_path": effective}
            if section is not None:
                kwargs[section] = overrides[section]
            print(f"stage {stage}")
            results[stage] = stage_flow(**kwargs)
    return results


if __name__ == "__main__":
    pipeline_flow()
