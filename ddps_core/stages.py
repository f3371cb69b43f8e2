"""The pipeline's stages, in order, each with exactly one implementation.

A stage is a function of the settings, :meth:`Stage.run` ``(settings, report)``. The ``ddps``
command calls it in-process, the Prefect flow of the same name calls it (``flows/``), and the
DVC stage of the same name runs that flow, so all three run the same code.

A *fan-out* stage (``extract``, ``label``, ``generate``) has :class:`Step` s. A step's
``plan(settings, n, report)`` prepares its outputs (creates a store, clears stale parts) and
returns the work still to do as at most ``n`` disjoint, JSON-able groups; ``part(settings,
group, report)`` does one group. Groups never share an output file, so they may run at the
same time. After its steps, the stage's ``main`` joins what they wrote. In-process,
:meth:`Stage.run` is nothing more than that loop; a flow maps each step's groups over tasks.
A simple stage has no steps, and ``main`` is all of it.

Stages are looked up by name (:func:`get`) and imported on first use, so that listing them
(``ddps --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddps_core.progress import Reporter

if TYPE_CHECKING:
    from ddps_core.config import Settings

__all__ = ["ORDER", "Stage", "Step", "get", "pictures"]


@dataclass(frozen=True)
class Step:
    """One fan-out step of a stage (see the module text)."""

    name: str
    plan: Callable[[Settings, int, Reporter], list[Any]]
    part: Callable[[Settings, Any, Reporter], Any]
    #: Into how many groups an orchestrator deals the step's work (``extract``: the number of
    #: shard writers). None: the orchestrator decides (its task runner's width).
    groups: Callable[[Settings], int] | None = None


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its fan-out steps (maybe none), then ``main``."""

    name: str
    main: Callable[[Settings, Reporter], dict[str, Any]]
    steps: tuple[Step, ...] = ()
    #: Where its work belongs: ``gpu`` work is tagged so that a Prefect work pool and the
    #: ``gpu`` concurrency limit route it; ``cpu`` work runs anywhere.
    device: Literal["cpu", "gpu"] = "gpu"
    #: The files and folders it writes, from the settings (what a flow run lists and shows).
    products: Callable[[Settings], list[str]] = lambda _settings: []

    def run(self, settings: Settings, report: Reporter | None = None) -> dict[str, Any]:
        """The whole stage in this process: every step's groups, one after the other, then
        ``main``. Returns ``main``'s summary (JSON-able); what a person should read about the
        outcome goes through ``report.log``."""
        report = report or Reporter()
        for step in self.steps:
            for group in step.plan(settings, 1, report):
                step.part(settings, group, report)
        return self.main(settings, report)


#: The stages in pipeline order (the order of ``dvc.yaml``), with the module defining each
#: as ``<NAME>`` (the stage name in capitals).
_MODULES: dict[str, str] = {
    "data": "ddps_core.datasets.stage",
    "train_ddpm": "ddps_core.diffusion.stage",
    "extract": "ddps_core.features.stage",
    "train_teacher": "ddps_core.teacher.stage",
    "label": "ddps_core.teacher.stage",
    "generate": "ddps_core.generate.stage",
    "train_student": "ddps_core.student.stage",
    "train_refiner": "ddps_core.refiner.stage",
    "refine": "ddps_core.refiner.stage",
    "evaluate": "ddps_core.metrics.stage",
    "report": "ddps_core.viz.stage",
}
ORDER: tuple[str, ...] = tuple(_MODULES)


def pictures(paths: list[str], limit: int = 6) -> list[Path]:
    """The PNG pictures among ``paths`` and directly inside those that are folders (at most
    ``limit``, in order), e.g. a stage's :attr:`Stage.products`."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.glob("*.png"))[: limit - len(found)]
        elif p.suffix.lower() == ".png" and p.is_file():
            found.append(p)
    return found[:limit]


def get(name: str) -> Stage:
    """The stage called ``name`` (one of :data:`ORDER`)."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(ORDER)}") from None
    stage = getattr(importlib.import_module(module), name.upper())
    assert isinstance(stage, Stage) and stage.name == name, f"{module}.{name.upper()} is not stage {name!r}"
    return stage
