"""dvc.yaml is wired to the code and settings it runs: every stage lists the modules its
flow imports (directly or through its tasks) as deps and its params.yaml sections as params,
metrics point at the summary JSONs, and the plots cover what the README promises."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _imports(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports (``tasks.*``, ``ddps_core.*``,
    ``flows.*``), names imported ``from`` a package counted as that package's submodules."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in ("tasks", "ddps_core", "flows")}


def _file_of(module: str) -> Path | None:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:k])
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py" if k == len(parts) else None
    return None


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def _stage_module(stage: dict) -> Path:
    match = re.fullmatch(r"python -m (flows\.\w+)", stage["cmd"])
    assert match, f"stage command {stage['cmd']!r} is not `python -m flows.<stage>`"
    return REPO / (match.group(1).replace(".", "/") + ".py")


#: Orchestration glue every stage shares, which cannot change a stage's outputs: reading
#: params.yaml into settings (the params of each stage cover its values) and the retry policy.
GLUE = {REPO / "flows/common.py", REPO / "tasks/common.py"}


def test_every_stage_depends_on_the_code_it_runs():
    problems = []
    for name, stage in STAGES.items():
        deps = [str(d) for d in stage.get("deps", [])]
        flow = _stage_module(stage)
        assert _covered(flow, deps), f"stage {name}: its flow {flow.relative_to(REPO)} is not a dep"
        # the flow's own imports, and those of the task modules it uses, one level down
        modules = _imports(flow)
        for m in list(modules):
            if m.startswith("tasks."):
                f = _file_of(m)
                if f is not None:
                    modules |= _imports(f)
        for m in sorted(modules):
            f = _file_of(m)
            if f is None or f.name == "__init__.py" and f.parent == REPO / "ddps_core":
                continue
            if f in GLUE:
                continue
            if not _covered(f, deps):
                problems.append(f"{name}: {f.relative_to(REPO)}")
    assert not problems, "stages miss deps on code they run:\n" + "\n".join(sorted(set(problems)))


def test_every_stage_lists_its_params_section():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    own = {"train_ddpm": "ddpm", "extract": "features", "train_ensemble": "teacher",
           "label": "teacher", "generate": "generate", "train_student": "student",
           "train_ddps": "refiner", "refine": "refiner", "evaluate": "evaluate", "data": "data"}
    for name, stage in STAGES.items():
        listed = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        assert own[name] in listed, f"stage {name} does not list its section {own[name]!r}"
        for p in listed:
            top = p.split(".")[0]
            assert top in params, f"stage {name}: param {p!r} is not in params.yaml"


def test_metrics_and_plots_are_declared():
    metrics = {next(iter(m)) if isinstance(m, dict) else m
               for s in STAGES.values() for m in s.get("metrics", [])}
    assert metrics == {"reports/metrics/ddpm_seg.json", "reports/metrics/ddps.json"}
    plots = {next(iter(p)) if isinstance(p, dict) else p: (p[next(iter(p))] if isinstance(p, dict) else {})
             for p in DVC["plots"]}
    assert plots["reports/plots/per_class_iou"]["y"] == "class_name"
    assert plots["reports/plots/ddps_steps"]["x"] == "step"
    assert plots["data/models/ddpm/loss.csv"]["x"] == "step"
    images = [p for p in plots if p.endswith(".png")]
    assert {"data/models/ddpm/samples.png", "reports/figures/ddps_refinement.png"} <= set(images)
    # every plotted file is produced by some stage (an out, or inside an out folder)
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in STAGES.values() for o in s.get("outs", [])]
    for p in plots:
        assert any(p == o or p.startswith(o.rstrip("/") + "/") for o in outs), f"plot {p} is no stage's output"
