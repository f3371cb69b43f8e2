"""One Prefect flow per pipeline stage, each running that stage's one implementation.

Every flow takes the same two parameters: ``overrides`` (settings to change for this run, as
``ddps --set`` takes them: ``{"ddpm.steps": 500}``) and ``params_path``. The settings are
validated before any work starts, so a bad key fails the run at once with one message
naming it.

A simple stage is one task (:data:`tasks.stage.run_stage`). A fan-out stage runs, for each of
its steps, a plan task and then one task per group of work the plan returns, on the task
runner that ``runner`` names (threads here, or Dask workers); then its ``main`` as a last task.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait

from ddps_core import stages
from ddps_core.config import Settings
from flows.artifacts import publish
from flows.common import failed_state, one_line_user_errors, parallel_tasks, settings_for, task_runner
from tasks.stage import finish_stage, plan_step, run_part, run_stage, tagged

__all__ = ["FLOWS", "run"]

one_line_user_errors()


def run(name: str, params_path: str | None, overrides: dict[str, Any] | None) -> Any:
    """Stage ``name`` inside the current flow run (see the module text); then its summary,
    pictures and outputs as artifacts of the run. Bad input ends the run Failed with its one
    line as the state's message (:func:`~flows.common.failed_state`)."""
    try:
        settings = settings_for(params_path, overrides)
        stage = stages.get(name)
        summary = _run(stage, settings)
    except Exception as exc:
        state = failed_state(exc)
        if state is None:
            raise
        return state
    products = stage.products(settings)
    try:
        publish(name, summary, stages.pictures(products), products)
    except Exception as exc:  # the artifacts are a courtesy: the stage's work is done and kept
        get_run_logger().warning("stage %s: artifacts not published: %s", name, exc)
    return summary


def _run(stage: stages.Stage, settings: Settings) -> dict[str, Any]:
    name = stage.name
    if not stage.steps:
        return tagged(run_stage, name)(name, settings)
    widths = {step.name: step.groups(settings) if step.groups else parallel_tasks(settings) for step in stage.steps}
    with task_runner(settings, max_workers=max(widths.values())) as runner:  # one cluster for the run
        for step in stage.steps:
            groups = tagged(plan_step, name)(name, step.name, settings, widths[step.name])
            if groups:
                _run_parts(runner, name, step.name, settings, groups)
    return tagged(finish_stage, name)(name, settings)


def _run_parts(runner: Any, name: str, step: str, settings: Settings, groups: list[Any]) -> None:
    part = tagged(run_part, name)
    futures = [runner.submit(part, {"name": name, "step": step, "settings": settings, "group": g}) for g in groups]
    wait(futures)
    for future in futures:
        future.result()  # the first failed part fails the stage, with its own message


# One flow per stage, spelled out so that a deployment's entrypoint names a plain function.
@flow(name="data", log_prints=True)
def data(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage data: make or import the canonical dataset (data.out)."""
    return run("data", params_path, overrides)


@flow(name="train_ddpm", log_prints=True)
def train_ddpm(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage train_ddpm: train the diffusion model, or adopt ddpm.checkpoint."""
    return run("train_ddpm", params_path, overrides)


@flow(name="extract", log_prints=True)
def extract(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage extract: DDPM-Seg features of the splits of features.splits (the training split by
    default) into feature stores, shard by shard."""
    return run("extract", params_path, overrides)


@flow(name="train_teacher", log_prints=True)
def train_teacher(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage train_teacher: the pixel-MLP teacher and its baselines."""
    return run("train_teacher", params_path, overrides)


@flow(name="label", log_prints=True)
def label(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage label: the test split with every method, the unlabelled pool with the teacher."""
    return run("label", params_path, overrides)


@flow(name="generate", log_prints=True)
def generate(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage generate: the label-efficient generated dataset."""
    return run("generate", params_path, overrides)


@flow(name="train_student", log_prints=True)
def train_student(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage train_student: the segmentor distilled from the generated dataset."""
    return run("train_student", params_path, overrides)


@flow(name="train_refiner", log_prints=True)
def train_refiner(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage train_refiner: the DDPS mask prior on the frozen student."""
    return run("train_refiner", params_path, overrides)


@flow(name="refine", log_prints=True)
def refine(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage refine: refinement of the test split, scored at every step."""
    return run("refine", params_path, overrides)


@flow(name="evaluate", log_prints=True)
def evaluate(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage evaluate: every method's test predictions scored in one report."""
    return run("evaluate", params_path, overrides)


@flow(name="report", log_prints=True)
def report(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage report: the pictures and plot tables of the scores."""
    return run("report", params_path, overrides)


#: Stage name -> its flow, in pipeline order.
FLOWS = {name: globals()[name] for name in stages.ORDER}
